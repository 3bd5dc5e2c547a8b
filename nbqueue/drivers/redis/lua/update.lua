-- KEYS: record; ARGV: fields. Changes an existing record only.
if redis.call('EXISTS', KEYS[1]) == 1 then apply(KEYS[1], 1) end
return 1
