-- ARGV: prefix, now, lease deadline, record key prefix or '', results index, worker (see
-- lease.lua), limit, batch, queues... Requeues expired leases and moves due delayed
-- messages to ready (up to `batch` each per queue), then claims up to `limit` messages,
-- best score across the queues first. With a record key prefix (the result backend on
-- this server) each claimed task's record is also begun: marked RECEIVED with a new
-- fencing token (0 when the record is final), as the backend's begin_many would, in the
-- same call. A message whose lease ran out gets one more lapse as it is requeued; one
-- with lapses is claimed alone and not begun. Returns {next due time (when no ready
-- message is left: a score as Redis gives it, or the lease deadline as given) or '', '1'
-- if ready messages are left else '0', then (id, queue, body, attempt, priority, token,
-- lapses) per claim}. The signal list of a queue left with nothing ready is deleted.
local limit = tonumber(ARGV[7])
local KINDS = {'inflight', 'delayed'}
local queues = {}
for i = 9, #ARGV do queues[#queues + 1] = ARGV[i] end

-- heads[key]: the lowest {member, score} of an inflight or delayed set as read here (or, for
-- an inflight set, as this call's leases made it), false for an empty one, nil where not known
local heads = {}
local due = tonumber(now)
for _, q in ipairs(queues) do
  for _, kind in ipairs(KINDS) do
    local key = qkey(q, kind)
    local head = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
    heads[key] = head[1] and head or false
    if head[1] and tonumber(head[2]) <= due then
      heads[key] = nil
      for _, id in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', '0', ARGV[8])) do
        redis.call('ZREM', key, id)
        if kind == 'inflight' and redis.call('EXISTS', mkey(id)) == 1 then
          redis.call('HINCRBY', mkey(id), 'lapses', '1')    -- its lease ran out: a delivery that did not finish
        end
        make_ready(q, id)
      end
    end
  end
end

local out = {'', '0'}
local claimed = 0
local drained = false       -- every ready set found empty (and nothing made ready since)
local single = #queues == 1
while claimed < limit do
  local best_q, best_id, best_score
  if single then
    -- one queue: its head taken off at once (put back, with its score, when it is left)
    local head = redis.call('ZPOPMIN', qkey(queues[1], 'ready'))
    if head[1] then best_q, best_id, best_score = queues[1], head[1], head[2] end
  else
    for _, q in ipairs(queues) do
      local head = redis.call('ZRANGE', qkey(q, 'ready'), '0', '0', 'WITHSCORES')
      if head[1] and (best_score == nil or tonumber(head[2]) < best_score) then
        best_q, best_id, best_score = q, head[1], tonumber(head[2])
      end
    end
  end
  if best_q == nil then drained = true break end
  local msg = mkey(best_id)
  local fields = redis.call('HMGET', msg, 'body', 'priority', 'lapses')
  local lapses = tonumber(fields[3]) or 0
  -- a message with a lapsed delivery comes alone: left for the next claim if this one has some
  if fields[1] and lapses > 0 and claimed > 0 then
    if single then redis.call('ZADD', qkey(best_q, 'ready'), best_score, best_id) end
    break
  end
  if not single then redis.call('ZREM', qkey(best_q, 'ready'), best_id) end
  if fields[1] then
    local attempt = redis.call('HINCRBY', msg, 'attempt', '1')
    -- after a lapse, not begun: the worker first checks for a live attempt
    local token = lease(best_q, best_id, lapses == 0)
    -- the in-flight set's lowest deadline follows without reading the set again
    local inflight = qkey(best_q, 'inflight')
    local head = heads[inflight]
    if head and head[1] == best_id then
      heads[inflight] = nil
    elseif head == false or head and tonumber(deadline) < tonumber(head[2]) then
      heads[inflight] = {best_id, deadline}
    end
    local n = #out
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = best_id, best_q, fields[1], attempt
    out[n + 5], out[n + 6], out[n + 7] = fields[2], token, lapses
    claimed = claimed + 1
    if lapses > 0 then break end
  end
end

-- a queue left with nothing ready drops its wake-up tokens: each stood for a message
-- published while nobody waited, claimed by now, and would only end a later wait early
for _, q in ipairs(queues) do
  if not drained and redis.call('ZCARD', qkey(q, 'ready')) > 0 then out[2] = '1' else redis.call('DEL', qkey(q, 'signal')) end
end
if out[2] == '0' then
  local next_due
  for _, q in ipairs(queues) do
    for _, kind in ipairs(KINDS) do
      local key = qkey(q, kind)
      local head = heads[key]
      if head == nil then head = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES') end
      if head and head[2] and (next_due == nil or tonumber(head[2]) < tonumber(next_due)) then next_due = head[2] end
    end
  end
  out[1] = next_due or ''
end
return out
