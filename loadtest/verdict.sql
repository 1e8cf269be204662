-- verdict.sql: the exactly-once verdict's statements (loadtest/verdict.py),
-- by name. The ledger is copied into loadtest_answers (every 202, a vote_id
-- answered again included), then loadtest_ledger holds each vote_id once.

-- name: create
CREATE TEMPORARY TABLE loadtest_answers (vote_id uuid NOT NULL, poll_id uuid NOT NULL);

-- name: distinct
CREATE TEMPORARY TABLE loadtest_ledger AS
SELECT vote_id, min(poll_id::text)::uuid AS poll_id
FROM loadtest_answers GROUP BY vote_id;
ALTER TABLE loadtest_ledger ADD PRIMARY KEY (vote_id);
ANALYZE loadtest_ledger;

-- name: summary
SELECT (SELECT count(*) FROM loadtest_answers) AS answered,
       (SELECT count(*) FROM loadtest_ledger) AS distinct_votes,
       (SELECT count(DISTINCT poll_id) FROM loadtest_ledger) AS polls,
       (SELECT min(poll_id::text)::uuid FROM loadtest_ledger) AS first_poll,
       (SELECT array_agg(vote_id) FROM (
            SELECT vote_id FROM loadtest_answers GROUP BY vote_id
            HAVING count(DISTINCT poll_id) > 1) AS c) AS conflicts;

-- name: missing
-- Ledger votes not (yet) in the votes table: the wait's condition.
SELECT count(*) FROM loadtest_ledger AS l
WHERE NOT EXISTS (SELECT 1 FROM votes AS v WHERE v.poll_id = l.poll_id AND v.vote_id = l.vote_id);

-- name: check
-- Each ledger vote against every votes row with its vote_id, in any poll: one
-- row, in its poll, is exactly once. The votes primary key is (poll_id,
-- vote_id), so a vote_id twice can only be in two polls. Beside them, the
-- votes of the ledger's polls, and those of them no 202 was seen for.
WITH matched AS (
    SELECT l.vote_id,
           count(v.vote_id) AS copies,
           count(v.vote_id) FILTER (WHERE v.poll_id = l.poll_id) AS in_its_poll
    FROM loadtest_ledger AS l
    LEFT JOIN votes AS v ON v.vote_id = l.vote_id
    GROUP BY l.vote_id
)
SELECT count(*) FILTER (WHERE copies = 0) AS missing,
       count(*) FILTER (WHERE copies > 1) AS duplicated,
       count(*) FILTER (WHERE copies = 1 AND in_its_poll = 0) AS wrong_poll,
       (array_agg(vote_id) FILTER (WHERE copies <> 1 OR in_its_poll <> 1))[1:$1] AS samples,
       (SELECT count(*) FROM votes AS v
        WHERE v.poll_id IN (SELECT DISTINCT poll_id FROM loadtest_ledger)) AS stored,
       (SELECT count(*) FROM votes AS v
        WHERE v.poll_id IN (SELECT DISTINCT poll_id FROM loadtest_ledger)
          AND NOT EXISTS (SELECT 1 FROM loadtest_ledger AS l WHERE l.vote_id = v.vote_id))
       AS unexpected
FROM matched;

-- name: recount
-- Rule 7 for the polls of the run: tallies and total_ballots equal a recount,
-- and single-vote polls agree with voter_ballots. $1: the run's one poll, or
-- null for every poll (audit_polls reads the votes table twice either way).
SELECT a.poll_id
FROM audit_polls($1) AS a
WHERE a.poll_id IN (SELECT DISTINCT poll_id FROM loadtest_ledger)
  AND (a.total_ballots IS DISTINCT FROM a.recount_ballots
       OR a.votes IS DISTINCT FROM a.recount_votes
       OR a.not_current <> 0 OR a.current_not_counted <> 0 OR a.options_differ <> 0);
