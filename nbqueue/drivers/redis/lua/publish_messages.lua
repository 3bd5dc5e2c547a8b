-- Stores the messages (id, queue, priority, eta or '', body) in ARGV[first..] whose id is not
-- known yet, ready or delayed, and signals their queues; returns how many. ARGV[2] is now.
-- Needs queues.lua.
local function publish_messages(first)
  local now = tonumber(ARGV[2])
  local added, n = {}, 0
  for i = first, #ARGV, 5 do
    local id, q, prio, eta, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    if redis.call('EXISTS', mkey(id)) == 0 then
      redis.call('HSET', mkey(id), 'queue', q, 'body', body, 'priority', prio, 'attempt', '0')
      if eta ~= '' and tonumber(eta) > now then
        redis.call('ZADD', qkey(q, 'delayed'), eta, id)
      else
        make_ready(q, id, prio)
      end
      added[q] = (added[q] or 0) + 1
      n = n + 1
    end
  end
  for q, count in pairs(added) do
    redis.call('SADD', P .. 'queues', q)
    signal(q, count)
  end
  return n
end
