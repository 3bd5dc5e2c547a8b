-- Deletes payload k once no owner links it; returns 1 when deleted.
local function gone(P, k)
  if redis.call('HLEN', P .. 'pl:' .. k .. ':refs') == 0 then
    redis.call('ZREM', P .. 'pl:check', k)
    return redis.call('DEL', P .. 'pl:' .. k)
  end
  return 0
end
