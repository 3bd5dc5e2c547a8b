-- ARGV: prefix, now, lease deadline, record key prefix or '', results index, worker, then
-- (id, queue, priority, body) per message. Publishes messages already reserved by the
-- worker publishing its own follow-ups (attempt 1, in flight until the deadline, so a dead
-- worker's lease brings them back) and begins their records. Returns one token per
-- message ('-' for an id already known: not published).
local now, deadline = ARGV[2], ARGV[3]
local rec_prefix, index, worker = ARGV[4], ARGV[5], ARGV[6]
-- begins a claimed task's record where a record key prefix was given (see begin.lua)
local function begin(id, q)
  if rec_prefix == '' then return '' end
  return begin_record(rec_prefix .. id, index, id, 'RECEIVED', worker, now, {'queue', q})
end
local out = {}
for i = 7, #ARGV, 4 do
  local id, q, prio, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('EXISTS', mkey(id)) == 0 then
    redis.call('HSET', mkey(id), 'queue', q, 'body', body, 'priority', prio, 'attempt', 1)
    redis.call('SADD', P .. 'queues', q)
    redis.call('ZADD', qkey(q, 'inflight'), deadline, id)
    out[#out + 1] = begin(id, q)
  else
    out[#out + 1] = '-'
  end
end
return out
