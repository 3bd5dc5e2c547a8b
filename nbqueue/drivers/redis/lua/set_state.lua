-- KEYS: record, index, expiring, done list; ARGV: id, state, token or '', created_at for a
-- new record, ttl ms or '', expires_at or '', then a count n, n name/value pairs to set and
-- names to delete (see state.lua). 1 when written, else 0.
local n = tonumber(ARGV[7])
local dels = {}
for i = 8 + 2 * n, #ARGV do dels[#dels + 1] = ARGV[i] end
return write_state(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV, {unpack(ARGV, 8, 7 + 2 * n)}, dels)
