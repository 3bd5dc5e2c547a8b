-- ARGV: prefix, queue, batch. Deletes up to `batch` messages of the queue (any state);
-- forgets the queue once it is empty. Returns the deleted messages' bodies.
local q, batch = ARGV[2], tonumber(ARGV[3])
local bodies = {}
for _, kind in ipairs({'ready', 'delayed', 'inflight', 'dead'}) do
  local key = qkey(q, kind)
  local ids = redis.call('ZRANGE', key, 0, batch - #bodies - 1)
  for _, id in ipairs(ids) do
    bodies[#bodies + 1] = redis.call('HGET', mkey(id), 'body') or ''
    redis.call('ZREM', key, id)
    redis.call('DEL', mkey(id))
  end
  if #bodies >= batch then return bodies end
end
redis.call('DEL', qkey(q, 'signal'))
redis.call('SREM', P .. 'queues', q)
return bodies
