-- Acknowledges delivery ``attempt`` of message id: deletes the message while that attempt
-- holds its lease and, given a result record key (not ''), only once that record is final
-- (its result, queued ahead of the ack, was really stored); ``final``: that record is known
-- to be final (not read again). 1 when deleted, else 0.
local function ack(id, attempt, rec, final)
  local current = redis.call('HMGET', mkey(id), 'attempt', 'queue')
  if current[1] ~= attempt then return 0 end
  if rec and rec ~= '' and not final and not FINAL[redis.call('HGET', rec, 'state') or ''] then return 0 end
  if redis.call('ZREM', qkey(current[2], 'inflight'), id) == 0 then return 0 end
  redis.call('DEL', mkey(id))
  return 1
end
