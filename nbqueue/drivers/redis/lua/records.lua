-- Helpers of the backend's record scripts.
-- fields from ARGV[start]: a count n, n name/value pairs to set, then names to delete
local function apply(key, start)
  local i = start + 1
  for _ = 1, tonumber(ARGV[start]) do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  for j = i, #ARGV do redis.call('HDEL', key, ARGV[j]) end
end
