-- drain_ceiling.sql: stage 4's PostgreSQL ceiling (loadtest/bench/drain.py).
-- The drain's rows written by bare batch upserts, none of voteflow's rules:
-- each statement takes one batch as arrays ($1 polls, $2 vote_ids, $3 voters,
-- $4 option-id-array literals, $5 received times in microseconds); the tally
-- and counter statements take $1 polls and $2 option literals, or $1 polls.
-- The rows that concurrent batches share are locked in key order first
-- (tallies, then counters, as cast_vote_atomic); the others are one
-- connection's own (each vote id is new, each voter's rows go to one
-- connection): so no two batches can deadlock.

-- name: votes
INSERT INTO votes (poll_id, vote_id, voter, option_ids, received_at, counted)
SELECT b.p, b.v, b.u, b.o::uuid[],
       timestamptz 'epoch' + b.t * interval '1 microsecond', true
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[]) AS b(p, v, u, o, t)
ON CONFLICT DO NOTHING;

-- name: ballots
INSERT INTO voter_ballots (poll_id, voter, vote_id, received_at, option_ids)
SELECT DISTINCT ON (b.p, b.u COLLATE "C") b.p, b.u, b.v,
       timestamptz 'epoch' + b.t * interval '1 microsecond', b.o::uuid[]
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[]) AS b(p, v, u, o, t)
ORDER BY b.p, b.u COLLATE "C", b.t DESC, b.v DESC
ON CONFLICT (poll_id, voter) DO UPDATE
SET vote_id = excluded.vote_id, received_at = excluded.received_at,
    option_ids = excluded.option_ids
WHERE (excluded.received_at, excluded.vote_id)
    > (voter_ballots.received_at, voter_ballots.vote_id);

-- name: lock_tallies
WITH d AS (
    SELECT b.p, x.o, count(*) AS n
    FROM unnest($1::uuid[], $2::text[]) AS b(p, o)
    CROSS JOIN LATERAL unnest(b.o::uuid[]) AS x(o)
    GROUP BY b.p, x.o
)
SELECT FROM tallies AS t JOIN d ON t.poll_id = d.p AND t.option_id = d.o
ORDER BY t.poll_id, t.option_id FOR UPDATE OF t;

-- name: tallies
WITH d AS (
    SELECT b.p, x.o, count(*) AS n
    FROM unnest($1::uuid[], $2::text[]) AS b(p, o)
    CROSS JOIN LATERAL unnest(b.o::uuid[]) AS x(o)
    GROUP BY b.p, x.o
)
UPDATE tallies AS t SET votes = t.votes + d.n
FROM d WHERE t.poll_id = d.p AND t.option_id = d.o;

-- name: lock_counters
WITH d AS (SELECT b.p, count(*) AS n FROM unnest($1::uuid[]) AS b(p) GROUP BY b.p)
SELECT FROM poll_counters AS c JOIN d ON c.poll_id = d.p
ORDER BY c.poll_id FOR UPDATE OF c;

-- name: counters
WITH d AS (SELECT b.p, count(*) AS n FROM unnest($1::uuid[]) AS b(p) GROUP BY b.p)
UPDATE poll_counters AS c SET total_ballots = c.total_ballots + d.n,
    version = c.version + 1, updated_at = now()
FROM d WHERE c.poll_id = d.p;
