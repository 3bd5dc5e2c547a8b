-- ARGV: prefix, now, lease deadline, record key prefix or '', results index, worker (see
-- lease.lua), then (id, queue, priority, body) per message. Publishes messages already
-- reserved by the worker publishing its own follow-ups (attempt 1, in flight until the
-- deadline, so a dead worker's lease brings them back) and begins their records. Returns
-- one token per message ('-' for an id already known: not published).
local out = {}
for i = 7, #ARGV, 4 do
  local id, q, prio, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('EXISTS', mkey(id)) == 0 then
    redis.call('HSET', mkey(id), 'queue', q, 'body', body, 'priority', prio, 'attempt', '1')
    redis.call('SADD', P .. 'queues', q)
    out[#out + 1] = lease(q, id, true)
  else
    out[#out + 1] = '-'
  end
end
return out
