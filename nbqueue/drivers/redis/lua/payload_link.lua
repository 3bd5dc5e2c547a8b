-- ARGV: P (prefix), owner, now, keys...: links the payloads that exist to owner; returns the missing keys
local P, owner, now = ARGV[1], ARGV[2], ARGV[3]
local missing = {}
for i = 4, #ARGV do
  local k = ARGV[i]
  if redis.call('EXISTS', P .. 'pl:' .. k) == 1 then
    redis.call('HSET', P .. 'pl:' .. k .. ':refs', owner, now)
    redis.call('SADD', P .. 'pl:owner:' .. owner, k)
  else
    missing[#missing + 1] = k
  end
end
return missing
