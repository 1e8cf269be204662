-- sql/functions/tally_history.sql: writing each poll's tally over time, and
-- reading it (GET /api/polls/{id}/history); the table is in
-- 0011_tally_history.sql.
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

-- One statement per batch, not one per poll: a batch over many polls (the
-- drain's 500 votes touch some 250) records them all in one set-based insert.
CREATE OR REPLACE FUNCTION tally_history_record() RETURNS trigger
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

-- CREATE OR REPLACE TRIGGER (PostgreSQL 14 or later): a database migrated
-- before this file existed has the trigger from 0011 already.
CREATE OR REPLACE TRIGGER poll_counters_history
AFTER UPDATE ON poll_counters
REFERENCING OLD TABLE AS unchanged NEW TABLE AS changed
FOR EACH STATEMENT
EXECUTE FUNCTION tally_history_record();

-- The history at a step of p_step_s seconds (buckets aligned on the Unix
-- epoch): one row per bucket in which the tally changed, at the bucket's
-- start, with the tally as the bucket's last change left it. A bucket with
-- no row kept the tally of the row before it.
CREATE OR REPLACE FUNCTION poll_history(p_poll_id uuid, p_step_s int)
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
