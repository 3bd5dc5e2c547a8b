-- Acknowledges delivery ``attempt`` of message id: deletes the message while that attempt
-- holds its lease and, given a result record key (not ''), only once that record is final
-- (its result, queued ahead of the ack, was really stored). 1 when deleted, else 0.
local function ack(id, attempt, rec)
  local current = redis.call('HMGET', mkey(id), 'attempt', 'queue')
  if current[1] ~= attempt then return 0 end
  if rec and rec ~= '' and not FINAL[redis.call('HGET', rec, 'state') or ''] then return 0 end
  local inflight = qkey(current[2], 'inflight')
  if not redis.call('ZSCORE', inflight, id) then return 0 end
  redis.call('ZREM', inflight, id)
  redis.call('DEL', mkey(id))
  return 1
end
