-- KEYS: index, record...; ARGV: per record a count n, then n name/value pairs
-- (id and created_at among them). Existing records are left alone.
local i = 1
for k = 2, #KEYS do
  local n = tonumber(ARGV[i])
  if redis.call('EXISTS', KEYS[k]) == 0 then
    local id, created
    for j = i + 1, i + 2 * n, 2 do
      if ARGV[j] == 'id' then id = ARGV[j + 1] elseif ARGV[j] == 'created_at' then created = ARGV[j + 1] end
    end
    redis.call('HSET', KEYS[k], unpack(ARGV, i + 1, i + 2 * n))
    redis.call('ZADD', KEYS[1], created, id)
  end
  i = i + 1 + 2 * n
end
return 1
