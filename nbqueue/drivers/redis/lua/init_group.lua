-- KEYS: group, members; ARGV: total, meta, created_at, member ids. Idempotent.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'meta', ARGV[2], 'created_at', ARGV[3])
for i = 4, #ARGV do redis.call('HSETNX', KEYS[2], ARGV[i], i - 4) end
return 1
