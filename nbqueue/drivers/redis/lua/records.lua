-- Helpers of the backend's record scripts.
-- fields from ARGV[start]: a count n, n name/value pairs to set (after the pairs of
-- ``first``, a table or nil), then names to delete
local function apply(key, start, first)
  local n = tonumber(ARGV[start])
  local stop = start + 2 * n
  if first then
    for i = start + 1, stop do first[#first + 1] = ARGV[i] end
    if #first > 0 then redis.call('HSET', key, unpack(first)) end
  elseif n > 0 then
    redis.call('HSET', key, unpack(ARGV, start + 1, stop))
  end
  if #ARGV > stop then redis.call('HDEL', key, unpack(ARGV, stop + 1, #ARGV)) end
end
