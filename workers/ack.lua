-- Acknowledge committed entries, then trim the stream below its oldest entry
-- that is pending or not yet delivered. Acknowledged entries leave at once,
-- so a shard's length is its backlog, which the edges compare with their
-- limit; an entry not yet acknowledged is never trimmed.
--
-- KEYS[1] stream shard
-- ARGV[1] consumer group   ARGV[2..n] entry ids
-- Returns the number of entries acknowledged.

local group = ARGV[1]
local acked = 0
-- In slices: unpack() of thousands of arguments overflows Lua's stack.
for first = 2, #ARGV, 1000 do
  local last = math.min(first + 999, #ARGV)
  acked = acked + redis.call('XACK', KEYS[1], group, unpack(ARGV, first, last))
end

local min_id
local summary = redis.call('XPENDING', KEYS[1], group)
if summary[1] > 0 then
  min_id = summary[2]
else
  -- Nothing pending: every entry up to the last one delivered is acknowledged.
  local delivered
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local fields = {}
    for i = 1, #info, 2 do
      fields[info[i]] = info[i + 1]
    end
    if fields['name'] == group then
      delivered = fields['last-delivered-id']
    end
  end
  if not delivered or delivered == '0-0' then
    return acked
  end
  local ms, seq = string.match(delivered, '^(%d+)-(%d+)$')
  min_id = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end
-- '~': whole blocks of entries only, cheap; it keeps a few more, never fewer.
redis.call('XTRIM', KEYS[1], 'MINID', '~', min_id)
return acked
