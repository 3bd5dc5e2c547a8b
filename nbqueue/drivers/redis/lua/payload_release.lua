-- ARGV: P, owners...; drops every link of the owners
local P, deleted = ARGV[1], 0
for i = 2, #ARGV do
  local owned = P .. 'pl:owner:' .. ARGV[i]
  for _, k in ipairs(redis.call('SMEMBERS', owned)) do
    redis.call('HDEL', P .. 'pl:' .. k .. ':refs', ARGV[i])
    deleted = deleted + gone(P, k)
  end
  redis.call('DEL', owned)
end
return deleted
