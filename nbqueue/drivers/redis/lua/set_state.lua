-- KEYS: record, index, expiring, done list; ARGV: id, state, token or '', created_at for a
-- new record, ttl ms or '', expires_at or '', then a count n, n name/value pairs to set and
-- names to delete (see state.lua). 1 when written, else 0.
local n = tonumber(ARGV[7])
return write_state(KEYS[1], KEYS[2], KEYS[3], KEYS[4], 1, 8, n, 8 + 2 * n, #ARGV - 7 - 2 * n)
