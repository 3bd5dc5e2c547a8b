-- KEYS: group, members, done, and optionally the member's record; ARGV: member id, ttl ms
-- or ''. Returns {done, total}, {-1, total} when a record is given and not SUCCESS (nothing
-- counted: the attempt that stores it counts it), or nil for an unknown group. The
-- group's keys get the results' TTL once every member is done.
local total = redis.call('HGET', KEYS[1], 'total')
if not total then return false end
if KEYS[4] and redis.call('HGET', KEYS[4], 'state') ~= 'SUCCESS' then return {-1, tonumber(total)} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then redis.call('SADD', KEYS[3], ARGV[1]) end
local done = redis.call('SCARD', KEYS[3])
if ARGV[2] ~= '' and done >= tonumber(total) then
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, ARGV[2]) end
end
return {done, tonumber(total)}
