-- 0011_tally_history.sql: each poll's tally over time, for
-- GET /api/polls/{id}/history: a page opened late, or after a restart, draws
-- the whole curve, then follows the live tallies. One row per poll and second
-- in which a batch changed the poll, written by a trigger on poll_counters in
-- the writers' own transaction; the trigger, its function and the reading
-- function are in sql/functions/tally_history.sql.

CREATE TABLE tally_history (
    poll_id       uuid        NOT NULL REFERENCES polls ON DELETE CASCADE,
    -- The second (truncated) in which the batches that left this tally ran.
    at            timestamptz NOT NULL,
    total_ballots bigint      NOT NULL,
    -- Each option's votes, in the poll's option order (options.position).
    votes         bigint[]    NOT NULL,
    PRIMARY KEY (poll_id, at)
);

-- Polls voted on before this migration: their tally as it stands, at the
-- second of its last change.
INSERT INTO tally_history (poll_id, at, total_ballots, votes)
SELECT c.poll_id, date_trunc('second', c.updated_at), c.total_ballots,
       array_agg(t.votes ORDER BY o.position)
FROM poll_counters AS c
JOIN options AS o ON o.poll_id = c.poll_id
JOIN tallies AS t ON t.poll_id = o.poll_id AND t.option_id = o.id
WHERE c.version > 0
GROUP BY c.poll_id;

