-- Move rejected entries to the dead letters and acknowledge committed ones,
-- then trim the stream below its oldest entry that is pending or not yet
-- delivered. Acknowledged entries leave at once, so a shard's length is its
-- backlog, which the edges compare with their limit; an entry not yet
-- acknowledged is never trimmed. One script: a rejected entry reaches the
-- dead letters exactly when it leaves the pending list, never twice and
-- never neither (and its keys share a slot, so it runs on a Redis Cluster).
-- A dead-lettered vote's idempotency key goes with it: the client's retry of
-- that vote_id is then queued again instead of answered "already queued".
--
-- KEYS[1] stream shard   KEYS[2] its dead letters
-- KEYS[3 ..] the idempotency keys of the rejected votes (those decodable)
-- ARGV[1] consumer group   ARGV[2] the message field name
-- ARGV[3] d, the number of rejected entries
-- ARGV[4 .. 3 + 3d] per rejected entry: its id, its message, the reason
-- ARGV[4 + 3d .. n] the ids to acknowledge (the rejected ones among them)
-- Returns the number of entries acknowledged.

local group = ARGV[1]
local dead = tonumber(ARGV[3])
for i = 0, dead - 1 do
  local at = 4 + 3 * i
  redis.call('XADD', KEYS[2], '*', 'entry', ARGV[at], ARGV[2], ARGV[at + 1], 'reason', ARGV[at + 2])
end
for i = 3, #KEYS do
  redis.call('DEL', KEYS[i])
end
local acked = 0
-- In slices: unpack() of thousands of arguments overflows Lua's stack.
for first = 4 + 3 * dead, #ARGV, 1000 do
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
