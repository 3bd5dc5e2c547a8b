-- KEYS: group, members; ARGV: record key prefix. Returns {total, state, count, ...}.
local total = redis.call('HGET', KEYS[1], 'total')
local members = redis.call('HKEYS', KEYS[2])
local counts = {}
for _, id in ipairs(members) do
  local state = redis.call('HGET', ARGV[1] .. id, 'state')
  if state then counts[state] = (counts[state] or 0) + 1 end
end
local out = {tonumber(total) or #members}
for state, n in pairs(counts) do
  out[#out + 1] = state
  out[#out + 1] = n
end
return out
