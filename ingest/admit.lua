-- Admit one vote: enforce the rate limits, drop a retry of a vote already
-- queued, and append the vote to its stream shard. One script, so that a vote
-- over a limit is never appended, and two concurrent retries of one vote_id
-- append it once.
--
-- KEYS[1] stream shard   KEYS[2] per-IP limiter   KEYS[3] per-voter limiter
-- KEYS[4] the vote_id's idempotency key (voteflow.keys.Keys.vote_seen)
-- ARGV[1] per-IP limit   ARGV[2] per-voter limit  (requests per minute; 0 = off)
-- ARGV[3] the message field name   ARGV[4] the encoded vote message
-- ARGV[5] seconds the idempotency key is kept
-- ARGV[6] most entries a shard may hold before votes for it are shed (0 = no limit)
-- ARGV[7] the ballot's digest (voteflow.message.Vote.digest)
-- KEYS share one slot (voteflow.keys), so the script runs on a Redis Cluster.
-- Returns {1, entry id} when appended, {2, ""} when the vote_id was already
-- queued (nothing appended), {0, milliseconds until allowed} when limited,
-- {3, ""} when the shard's backlog is full (nothing appended),
-- {4, ""} when the vote_id is queued with another ballot (nothing appended).
--
-- The limiters are GCRA (generic cell rate algorithm): each key holds the
-- "theoretical arrival time" of the next request, in ms. A limit of N per
-- minute lets N requests through at once, then one every 60000/N ms. One key
-- per subject, expiring by itself, no sorted sets to trim.

local WINDOW = 60000

-- A vote_id names one ballot: sent again with another, it is refused before
-- anything else (a client bug, or a guess at someone's vote_id), never
-- answered "queued" for a ballot that would not count.
local held = redis.call('GET', KEYS[4])
if held and held ~= ARGV[7] then
  return {4, ''}
end

-- Workers trim what they acknowledge, so a shard's length is its backlog.
-- Past the limit, refuse (the client retries later) rather than let Redis
-- memory grow until it is full.
local max_backlog = tonumber(ARGV[6])
if max_backlog > 0 and redis.call('XLEN', KEYS[1]) >= max_backlog then
  return {3, ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function next_tat(key, limit)
  if limit <= 0 then
    return nil, 0
  end
  local interval = WINDOW / limit
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  local wait = tat + interval - WINDOW - now
  if wait > 0 then
    return nil, wait
  end
  return tat + interval, 0
end

local ip_tat, ip_wait = next_tat(KEYS[2], tonumber(ARGV[1]))
local voter_tat, voter_wait = next_tat(KEYS[3], tonumber(ARGV[2]))
local wait = math.max(ip_wait, voter_wait)
if wait > 0 then
  return {0, math.ceil(wait)}
end
if ip_tat then
  redis.call('SET', KEYS[2], ip_tat, 'PX', math.ceil(ip_tat - now))
end
if voter_tat then
  redis.call('SET', KEYS[3], voter_tat, 'PX', math.ceil(voter_tat - now))
end
-- A retry keeps the first receipt's place: appending it again with a later
-- receive time could let it overtake a ballot the voter cast after it. Every
-- vote_id is remembered, the edge's own too: a client may resend the vote_id
-- it got in its 202.
if held then
  -- A write even for a retry: a WAIT after this call then covers the first
  -- receipt's append too, which precedes it in the replication stream. The
  -- vote_id is remembered for the window from its last retry.
  redis.call('EXPIRE', KEYS[4], ARGV[5])
  return {2, ''}
end
redis.call('SET', KEYS[4], ARGV[7], 'EX', ARGV[5])
return {1, redis.call('XADD', KEYS[1], '*', ARGV[3], ARGV[4])}
