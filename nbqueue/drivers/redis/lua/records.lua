-- Helpers of the backend's record scripts.
-- fields from ARGV[start]: a count n, n name/value pairs to set, then names to delete
local function apply(key, start)
  local n = tonumber(ARGV[start])
  local stop = start + 2 * n
  if n > 0 then redis.call('HSET', key, unpack(ARGV, start + 1, stop)) end
  if #ARGV > stop then redis.call('HDEL', key, unpack(ARGV, stop + 1, #ARGV)) end
end
