-- Helpers of the broker's scripts: key names under the prefix P (ARGV[1]), ready scores,
-- wake-up signals. Needs the constants TOKENS and SIGNAL_TTL (text). The scripts give
-- redis.call numbers as text ('0', '1'): Redis formats a Lua number with snprintf per call.
local P = ARGV[1]
local function qkey(q, kind) return P .. 'q:' .. q .. ':' .. kind end
local function mkey(id) return P .. 'msg:' .. id end
-- prio: the message's priority, read from it when not given
local function make_ready(q, id, prio)
  prio = tonumber(prio or redis.call('HGET', mkey(id), 'priority')) or 0
  local seq = redis.call('INCR', P .. 'seq')
  redis.call('ZADD', qkey(q, 'ready'), string.format('%d', (9 - prio) * 1e12 + seq), id)
end
local function signal(q, count)
  local key = qkey(q, 'signal')
  local pushed
  if count == 1 then
    pushed = redis.call('LPUSH', key, '1')
  else
    local tokens = {}
    for i = 1, math.min(count, TOKENS) do tokens[i] = '1' end
    pushed = redis.call('LPUSH', key, unpack(tokens))
  end
  if pushed > TOKENS then redis.call('LTRIM', key, 0, TOKENS - 1) end
  redis.call('PEXPIRE', key, SIGNAL_TTL)
end
