-- ARGV: prefix, queue, batch. Deletes up to `batch` messages of the queue (any state);
-- forgets the queue once it is empty. Returns how many were deleted.
local q, batch = ARGV[2], tonumber(ARGV[3])
local n = 0
for _, kind in ipairs({'ready', 'delayed', 'inflight', 'dead'}) do
  local key = qkey(q, kind)
  local ids = redis.call('ZRANGE', key, 0, batch - n - 1)
  for _, id in ipairs(ids) do
    redis.call('ZREM', key, id)
    redis.call('DEL', mkey(id))
  end
  n = n + #ids
  if n >= batch then return n end
end
redis.call('DEL', qkey(q, 'signal'))
redis.call('SREM', P .. 'queues', q)
return n
