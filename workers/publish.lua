-- Store a poll's tally snapshot and publish it, unless a newer one is stored.
-- Two workers may commit batches of the same poll and reach Redis in either
-- order; comparing versions here keeps the snapshot at the latest commit.
--
-- KEYS[1] snapshot hash
-- ARGV[1] version  ARGV[2] encoded tally  ARGV[3] channel
-- ARGV[4] hash field of the version       ARGV[5] hash field of the tally
-- ARGV[6] PUBLISH, or SPUBLISH for sharded pub/sub on a cluster (the channel
--         shares the snapshot's slot)
-- Returns 1 when stored and published, 0 when an equal or newer one was there.
local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[4]) or '-1')
if tonumber(ARGV[1]) <= stored then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[1], ARGV[5], ARGV[2])
redis.call(ARGV[6], ARGV[3], ARGV[2])
return 1
