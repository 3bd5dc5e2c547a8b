-- Begins a task's record: ``state`` (RECEIVED or STARTED) with a new fencing token, the
-- worker and the start time; a record not there yet is made (with the name/value pairs of
-- ``new`` first). Returns the token, or 0 when the record is final. Needs FINAL.
-- Used by the backend's begin_many and, on one server, by the claim scripts.
local function begin_record(rec, index, id, state, worker, now, new)
  local current = redis.call('HGET', rec, 'state')
  if current and FINAL[current] then return 0 end
  if current then
    redis.call('HSET', rec, 'state', state, 'worker', worker, 'started_at', now)
    return redis.call('HINCRBY', rec, 'token', '1')
  end
  local fields = {}
  for j = 1, #new do fields[j] = new[j] end
  for _, v in ipairs({'id', id, 'state', state, 'token', '1', 'worker', worker, 'started_at', now, 'created_at', now}) do
    fields[#fields + 1] = v
  end
  redis.call('HSET', rec, unpack(fields))
  redis.call('ZADD', index, now, id)
  return 1
end
