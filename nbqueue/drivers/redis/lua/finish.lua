-- A worker's finish in one call: results, then acks. ARGV: prefix (of the broker and the
-- result backend, whose key names follow from it: see nbqueue.drivers.redis.backend), the
-- number of results, then per result: id, state, token or '', created_at, ttl ms or '',
-- expires_at or '', a count n, n name/value pairs, a count m, m names to delete (see
-- state.lua); then per ack: message id, attempt, and '1' where the ack acts only once the
-- message's record is final (see ack.lua). Returns 1/0 per result (stored or not).
local rec_prefix, index, expiring, done_prefix = P .. 'r:', P .. 'results', P .. 'expiring', P .. 'done:'
local stored, final = {}, {}
local i = 3
for r = 1, tonumber(ARGV[2]) do
  local id, n = ARGV[i], tonumber(ARGV[i + 6])
  local j = i + 7 + 2 * n
  local m = tonumber(ARGV[j])
  stored[r] = write_state(rec_prefix .. id, index, expiring, done_prefix .. id, i, i + 7, n, j + 1, m)
  -- written final here (and not expired at once by a ttl of 0): its ack need not read it again
  if stored[r] == 1 and FINAL[ARGV[i + 1]] and (ARGV[i + 4] == '' or tonumber(ARGV[i + 4]) > 0) then
    final[id] = true
  end
  i = j + m + 1
end
for k = i, #ARGV, 3 do
  local rec = ''
  if ARGV[k + 2] == '1' then rec = rec_prefix .. ARGV[k] end
  ack(ARGV[k], ARGV[k + 1], rec, final[ARGV[k]])
end
return stored
