-- 0011_tally_history.sql: each poll's tally over time, for
-- GET /api/polls/{id}/history: a page opened late, or after a restart, draws
-- the whole curve, then follows the live tallies.
--
-- One row per poll and second in which a batch changed the poll: the
-- cumulative tally as the last batch of that second left it. Written by the
-- writers' own transaction (the trigger below, on the poll_counters update
-- of cast_votes step (d)), so a tally and its history commit together, and
-- nothing is written for a batch that changed nothing.
--
-- Ordered by lock: the trigger runs while its transaction holds the poll's
-- poll_counters row lock, which every batch of the poll takes before it
-- writes here, so a later batch's clock_timestamp() is never earlier than an
-- earlier batch's, and the cumulative counts never go back in time.

CREATE TABLE tally_history (
    poll_id       uuid        NOT NULL REFERENCES polls ON DELETE CASCADE,
    -- The second (truncated) in which the batches that left this tally ran.
    at            timestamptz NOT NULL,
    total_ballots bigint      NOT NULL,
    -- Each option's votes, in the poll's option order (options.position).
    votes         bigint[]    NOT NULL,
    PRIMARY KEY (poll_id, at)
);

-- One statement per batch, not one per poll: a batch over many polls (the
-- drain's 500 votes touch some 250) records them all in one set-based insert.
CREATE FUNCTION tally_history_record() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO tally_history AS h (poll_id, at, total_ballots, votes)
    SELECT n.poll_id, date_trunc('second', clock_timestamp()), n.total_ballots,
           array_agg(t.votes ORDER BY o.position)
    FROM changed AS n
    JOIN unchanged AS p ON p.poll_id = n.poll_id
    JOIN options AS o ON o.poll_id = n.poll_id
    JOIN tallies AS t ON t.poll_id = o.poll_id AND t.option_id = o.id
    -- version grows with every batch that changed the poll's tallies or
    -- ballots (rule 5), and only then.
    WHERE n.version <> p.version
    GROUP BY n.poll_id, n.total_ballots
    ON CONFLICT (poll_id, at) DO UPDATE
    SET total_ballots = excluded.total_ballots, votes = excluded.votes;
    RETURN NULL;
END
$$;

CREATE TRIGGER poll_counters_history
AFTER UPDATE ON poll_counters
REFERENCING OLD TABLE AS unchanged NEW TABLE AS changed
FOR EACH STATEMENT
EXECUTE FUNCTION tally_history_record();

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

-- The history at a step of p_step_s seconds (buckets aligned on the Unix
-- epoch): one row per bucket in which the tally changed, at the bucket's
-- start, with the tally as the bucket's last change left it. A bucket with
-- no row kept the tally of the row before it.
CREATE FUNCTION poll_history(p_poll_id uuid, p_step_s int)
RETURNS TABLE (t timestamptz, total_ballots bigint, votes bigint[])
LANGUAGE sql
STABLE
AS $$
    SELECT DISTINCT ON (b.bucket) b.bucket, h.total_ballots, h.votes
    FROM tally_history AS h
    CROSS JOIN LATERAL (
        SELECT to_timestamp(floor(extract(epoch FROM h.at) / p_step_s) * p_step_s) AS bucket
    ) AS b
    WHERE h.poll_id = p_poll_id
    ORDER BY b.bucket, h.at DESC
$$;
