-- KEYS: record, index, expiring; ARGV: id, state, token or '', created_at for a new
-- record, ttl ms or '', expires_at or '', then fields. 1 when written, else 0.
local current = redis.call('HMGET', KEYS[1], 'state', 'token')
if current[1] then
  if FINAL[current[1]] then return 0 end
  if ARGV[3] ~= '' and (current[2] or '0') ~= ARGV[3] then return 0 end
else
  if ARGV[3] ~= '' then return 0 end
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'created_at', ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
apply(KEYS[1], 7, {'state', ARGV[2]})
if ARGV[5] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
end
if FINAL[ARGV[2]] then
  -- wake the task's waiters (blocked in BLPOP on its done list) in the same call
  redis.call('RPUSH', KEYS[4], '1')
  redis.call('PEXPIRE', KEYS[4], DONE_TTL_MS)
end
return 1
