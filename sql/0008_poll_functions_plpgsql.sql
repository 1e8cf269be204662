-- 0008_poll_functions_plpgsql.sql: the one-poll functions, unchanged in what
-- they return, in a form Citus can run (sql/citus/0002_functions.sql
-- delegates each by p_poll_id).
--
-- Citus refuses a LANGUAGE sql function that reads a distributed table when
-- PostgreSQL inlines it into the calling query ("parameterized queries for
-- SQL functions referencing distributed tables are not supported"; its hint:
-- use PL/pgSQL), and refuses a volatile function such as clock_timestamp() in
-- the SET of an UPDATE of a distributed table. In PL/pgSQL each statement is
-- planned on its own, with the poll as a parameter: one shard.
-- None of these is on a vote's path: the edge reads a poll on a cache miss,
-- a tally when no published one exists.

CREATE OR REPLACE FUNCTION close_poll(p_poll_id uuid, p_closed_at timestamptz) RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
    closes_at timestamptz;
BEGIN
    IF p_closed_at IS NULL THEN
        RAISE EXCEPTION 'close_poll: p_closed_at must not be null'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- As in 0001_schema.sql: wait for the batches that read the poll open,
    -- then close it no earlier than now (rule 6). The time is taken after the
    -- lock, as before, into a variable.
    PERFORM FROM polls WHERE id = p_poll_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    closes_at := greatest(p_closed_at, clock_timestamp());
    UPDATE polls SET closed_at = closes_at WHERE id = p_poll_id AND closed_at IS NULL;
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION poll_get(p_poll_id uuid)
RETURNS TABLE (
    id uuid,
    question text,
    allow_multiple_votes boolean,
    max_choices int,
    expires_at timestamptz,
    closed_at timestamptz,
    created_at timestamptz,
    option_ids uuid[],
    labels text[]
)
LANGUAGE plpgsql
STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT p.id, p.question, p.allow_multiple_votes, p.max_choices, p.expires_at,
           p.closed_at, p.created_at,
           array_agg(o.id ORDER BY o.position), array_agg(o.label ORDER BY o.position)
    FROM polls AS p
    JOIN options AS o ON o.poll_id = p.id
    WHERE p.id = p_poll_id
    GROUP BY p.id;
END
$$;

CREATE OR REPLACE FUNCTION poll_tally(p_poll_id uuid)
RETURNS TABLE (
    version bigint,
    total_ballots bigint,
    option_ids uuid[],
    votes bigint[],
    updated_at timestamptz
)
LANGUAGE plpgsql
STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT c.version, c.total_ballots,
           array_agg(o.id ORDER BY o.position), array_agg(t.votes ORDER BY o.position),
           c.updated_at
    FROM poll_counters AS c
    JOIN options AS o ON o.poll_id = c.poll_id
    JOIN tallies AS t ON t.poll_id = o.poll_id AND t.option_id = o.id
    WHERE c.poll_id = p_poll_id
    GROUP BY c.poll_id;
END
$$;

CREATE OR REPLACE FUNCTION poll_recount(p_poll_id uuid)
RETURNS TABLE (option_id uuid, votes bigint)
LANGUAGE plpgsql
STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT coalesce(o.id, c.option_id), coalesce(c.votes, 0)
    FROM (SELECT x.id, x.position FROM options AS x WHERE x.poll_id = p_poll_id) AS o
    FULL JOIN (
        SELECT u.option_id, count(*) AS votes
        FROM votes AS v CROSS JOIN LATERAL unnest(v.option_ids) AS u(option_id)
        WHERE v.poll_id = p_poll_id AND v.counted
        GROUP BY u.option_id
    ) AS c ON c.option_id = o.id
    ORDER BY o.position NULLS LAST, 1;
END
$$;

CREATE OR REPLACE FUNCTION poll_recount_ballots(p_poll_id uuid) RETURNS bigint
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
    RETURN (SELECT count(*) FROM votes AS v WHERE v.poll_id = p_poll_id AND v.counted);
END
$$;
