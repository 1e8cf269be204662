-- sql/functions/poll_reads.sql: what the HTTP edge reads: a poll with its
-- options, and a poll's tallies. Each is one indexed query, run on a
-- poll-cache miss or when no published tally snapshot exists yet.
--
-- PL/pgSQL, not SQL: Citus refuses a LANGUAGE sql function that reads a distributed table when
-- PostgreSQL inlines it into the calling query ("parameterized queries for
-- SQL functions referencing distributed tables are not supported"; its hint:
-- use PL/pgSQL), and refuses a volatile function such as clock_timestamp() in
-- the SET of an UPDATE of a distributed table. In PL/pgSQL each statement is
-- planned on its own, with the poll as a parameter: one shard.

-- A poll and its options in option order; no row if the poll does not exist.
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
    labels text[],
    require_voter_token boolean
)
LANGUAGE plpgsql
STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT p.id, p.question, p.allow_multiple_votes, p.max_choices, p.expires_at,
           p.closed_at, p.created_at,
           array_agg(o.id ORDER BY o.position), array_agg(o.label ORDER BY o.position),
           p.require_voter_token
    FROM polls AS p
    JOIN options AS o ON o.poll_id = p.id
    WHERE p.id = p_poll_id
    GROUP BY p.id;
END
$$;

-- A poll's committed tallies, options in option order; no row if the poll
-- does not exist.
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
