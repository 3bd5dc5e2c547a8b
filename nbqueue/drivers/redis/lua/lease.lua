-- Helpers of the scripts that hand out messages (reserve, publish_reserved). ARGV: prefix,
-- now, lease deadline, then a record key prefix or '', the results index and the worker:
-- given a record key prefix (the result backend on this server), the tasks' records are
-- begun in the same call. Needs queues.lua and begin.lua.
local now, deadline = ARGV[2], ARGV[3]
local rec_prefix, index, worker = ARGV[4], ARGV[5], ARGV[6]
-- Puts message id of queue q in flight until the deadline; with ``begin`` and a record key
-- prefix, its task's record is begun: marked RECEIVED with a new fencing token, returned
-- (0 when the record is final). Returns '' when no record is begun.
local function lease(q, id, begin)
  redis.call('ZADD', qkey(q, 'inflight'), deadline, id)
  if rec_prefix == '' or not begin then return '' end
  return begin_record(rec_prefix .. id, index, id, 'RECEIVED', worker, now, {'queue', q})
end
