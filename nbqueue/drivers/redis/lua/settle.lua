-- ARGV: prefix, id, attempt, op, now, then per op: ack (a result record key or '': see
-- ack.lua), extend (deadline), retry (eta or '', has_body, body), reject (reason). Acts
-- only while that attempt holds the lease; 1/0.
local id, attempt, op, now = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if op == 'ack' then return ack(id, attempt, ARGV[6]) end
local current = redis.call('HMGET', mkey(id), 'attempt', 'queue')
if current[1] ~= attempt then return 0 end
local q = current[2]
local inflight = qkey(q, 'inflight')
if not redis.call('ZSCORE', inflight, id) then return 0 end
if op == 'extend' then
  redis.call('ZADD', inflight, ARGV[6], id)
elseif op == 'retry' then
  redis.call('ZREM', inflight, id)
  if ARGV[7] == '1' then redis.call('HSET', mkey(id), 'body', ARGV[8]) end
  if ARGV[6] ~= '' and tonumber(ARGV[6]) > now then
    redis.call('ZADD', qkey(q, 'delayed'), ARGV[6], id)
  else
    make_ready(q, id)
  end
  signal(q, 1)
elseif op == 'reject' then
  redis.call('ZREM', inflight, id)
  redis.call('HSET', mkey(id), 'reason', ARGV[6])
  redis.call('ZADD', qkey(q, 'dead'), redis.call('INCR', P .. 'seq'), id)
else
  return redis.error_reply('unknown op ' .. op)
end
return 1
