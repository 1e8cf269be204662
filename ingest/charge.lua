-- Charge a request that appends nothing (a vote for a poll that does not
-- exist) to its client address's limiter: the GCRA step of admit.lua on the
-- same key, so that such votes and real ones spend one allowance.
--
-- KEYS[1] per-IP limiter (voteflow.keys.Keys.rate_ip)
-- ARGV[1] per-IP limit (requests per minute, > 0)
-- Returns 0 when within the limit (charged), else the milliseconds until the
-- address is allowed again (nothing charged), as admit.lua's {0, ms}.
--
-- The key holds the "theoretical arrival time" of the next request, in ms; a
-- limit of N per minute lets N requests through at once, then one every
-- 60000/N ms (admit.lua says more).

local WINDOW = 60000

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = WINDOW / tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
local wait = tat + interval - WINDOW - now
if wait > 0 then
  return math.ceil(wait)
end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(tat + interval - now))
return 0
