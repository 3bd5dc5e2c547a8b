-- ARGV: P, n, then n values (key, owner pairs), then keys that may have no links left
local P, n, deleted = ARGV[1], tonumber(ARGV[2]), 0
for i = 3, n + 2, 2 do
  local k, owner = ARGV[i], ARGV[i + 1]
  redis.call('HDEL', P .. 'pl:' .. k .. ':refs', owner)
  redis.call('SREM', P .. 'pl:owner:' .. owner, k)
  deleted = deleted + gone(P, k)
end
for i = n + 3, #ARGV do
  deleted = deleted + gone(P, ARGV[i])
end
return deleted
