-- KEYS: group. 1 for the first caller on an existing group, else 0.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 'chord', '1')
