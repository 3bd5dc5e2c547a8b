-- KEYS: index, record...; ARGV: now, worker, state (STARTED or RECEIVED), then per
-- record: id, retries or '', a count n and n name/value pairs for a new record.
-- Returns one token per record, 0 where the record is final.
local now, worker, new_state = ARGV[1], ARGV[2], ARGV[3]
local tokens = {}
local i = 4
for k = 2, #KEYS do
  local rec, id, retries, n = KEYS[k], ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local new = {}
  for j = i + 3, i + 2 + 2 * n do new[#new + 1] = ARGV[j] end
  local token = begin_record(rec, KEYS[1], id, new_state, worker, now, new)
  if token ~= 0 and retries ~= '' then redis.call('HSET', rec, 'retries', retries) end
  tokens[#tokens + 1] = token
  i = i + 3 + 2 * n
end
return tokens
