-- Writes a record's state and fields, fenced: nothing is written to a final record, nor,
-- given a token, to a record whose token differs, nor, given a token, to a missing record
-- (one without a token is made, and listed in the index). From ARGV, read in place: at
-- ``a``, id, state, token or '', created_at for a new record, ttl ms or '', expires_at or '';
-- at ``s``, ``n`` name/value pairs to set; at ``d``, ``m`` names to delete. A final state
-- wakes the task's waiters (a token pushed to its done list). Returns 1 when written, else
-- 0. Needs FINAL and DONE_TTL_MS.
local function write_state(rec, index, expiring, done, a, s, n, d, m)
  local id, state, token = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local current = redis.call('HMGET', rec, 'state', 'token')
  if current[1] then
    if FINAL[current[1]] then return 0 end
    if token ~= '' and (current[2] or '0') ~= token then return 0 end
  else
    if token ~= '' then return 0 end
    redis.call('HSET', rec, 'id', id, 'created_at', ARGV[a + 3])
    redis.call('ZADD', index, ARGV[a + 3], id)
  end
  redis.call('HSET', rec, 'state', state, unpack(ARGV, s, s + 2 * n - 1))
  if m > 0 then redis.call('HDEL', rec, unpack(ARGV, d, d + m - 1)) end
  if ARGV[a + 4] ~= '' then
    redis.call('PEXPIRE', rec, ARGV[a + 4])
    redis.call('ZADD', expiring, ARGV[a + 5], id)
  end
  if FINAL[state] then
    -- wake the task's waiters (blocked on its done list) in the same call
    redis.call('RPUSH', done, '1')
    redis.call('PEXPIRE', done, DONE_TTL_MS)
  end
  return 1
end
