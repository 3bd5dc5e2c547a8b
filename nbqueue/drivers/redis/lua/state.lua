-- Writes a record's state and fields, fenced: nothing is written to a final record, nor,
-- given a token, to a record whose token differs, nor, given a token, to a missing record
-- (one without a token is made, and listed in the index). ``a``: id, state, token or '',
-- created_at for a new record, ttl ms or '', expires_at or ''; ``sets``: name/value pairs;
-- ``dels``: names to delete. A final state wakes the task's waiters (a token pushed to its
-- done list). Returns 1 when written, else 0. Needs FINAL and DONE_TTL_MS.
local function write_state(rec, index, expiring, done, a, sets, dels)
  local current = redis.call('HMGET', rec, 'state', 'token')
  if current[1] then
    if FINAL[current[1]] then return 0 end
    if a[3] ~= '' and (current[2] or '0') ~= a[3] then return 0 end
  else
    if a[3] ~= '' then return 0 end
    redis.call('HSET', rec, 'id', a[1], 'created_at', a[4])
    redis.call('ZADD', index, a[4], a[1])
  end
  redis.call('HSET', rec, 'state', a[2], unpack(sets))
  if #dels > 0 then redis.call('HDEL', rec, unpack(dels)) end
  if a[5] ~= '' then
    redis.call('PEXPIRE', rec, a[5])
    redis.call('ZADD', expiring, a[6], a[1])
  end
  if FINAL[a[2]] then
    -- wake the task's waiters (blocked on its done list) in the same call
    redis.call('RPUSH', done, '1')
    redis.call('PEXPIRE', done, DONE_TTL_MS)
  end
  return 1
end
