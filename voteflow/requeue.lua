-- Send one dead letter back to its stream shard, to be written again.
-- One script: the vote is back in the stream exactly when it leaves the dead
-- letters, never twice and never neither, even with two requeues at once.
-- Its vote_id is remembered again (as the edge does on admission), so that a
-- client's retry meanwhile is answered "already queued" rather than queued
-- a second time; were it queued twice, cast_vote_atomic would count it once.
--
-- KEYS[1] the dead letters   KEYS[2] their stream shard
-- KEYS[3] the vote's idempotency key (absent when the message cannot be decoded)
-- ARGV[1] the dead letter's id   ARGV[2] the message field name
-- ARGV[3] seconds the idempotency key is kept   ARGV[4] the ballot's digest
-- Returns the new stream entry's id, or false when the dead letter is gone
-- (another requeue took it) or holds no message.
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return false
end
local fields = found[1][2]
local message
for i = 1, #fields, 2 do
  if fields[i] == ARGV[2] then
    message = fields[i + 1]
  end
end
if not message then
  return false
end
local id = redis.call('XADD', KEYS[2], '*', ARGV[2], message)
redis.call('XDEL', KEYS[1], ARGV[1])
if KEYS[3] then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[3])
end
return id
