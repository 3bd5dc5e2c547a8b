-- Creates the records KEYS[2..], indexed in KEYS[1] (results index), from ARGV[i..]: per
-- record a count n, then n name/value pairs (id and created_at among them). Existing
-- records are left alone. Returns the index of the first argument after them.
local function create_records(i)
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
  return i
end
