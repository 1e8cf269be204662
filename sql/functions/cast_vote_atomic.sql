-- sql/functions/cast_vote_atomic.sql: the two ways a worker writes a batch,
-- both through the rules of cast_votes (cast_votes.sql).
--
-- Calling cast_poll_votes once per poll, each in its own transaction, commits
-- a batch poll by poll instead of all at once. Nothing docs/guarantees.md promises
-- depends on the whole batch committing together: each vote_id still counts
-- once (a batch redelivered after a crash between two polls' commits finds
-- the first polls' votes recorded: duplicates), and each poll's tallies and
-- version still move once per call that changed them.

-- The whole batch: the polls it names, in id order, and their votes.
CREATE OR REPLACE FUNCTION cast_vote_atomic(p_votes vote_in[])
RETURNS TABLE (
    vote_id       uuid,
    poll_id       uuid,
    outcome       text,
    version       bigint,
    total_ballots bigint,
    option_ids    uuid[],
    votes         bigint[]
)
LANGUAGE plpgsql
AS $$
BEGIN
    RETURN QUERY
    SELECT *
    FROM cast_votes(
        ARRAY(SELECT DISTINCT v.poll_id FROM unnest(p_votes) AS v
              WHERE v.poll_id IS NOT NULL ORDER BY 1),
        p_votes);
END
$$;

-- The votes of one poll, all naming p_poll_id: the same outcome rows (one per
-- vote, in input order) and tally row (when the poll exists) as
-- cast_vote_atomic gives for them. On Citus it is a distributed function by
-- p_poll_id (sql/citus/), and the worker calls it once per poll of a batch,
-- outside any transaction block, as `SELECT * FROM cast_poll_votes($1, $2)`.
CREATE OR REPLACE FUNCTION cast_poll_votes(p_poll_id uuid, p_votes vote_in[])
RETURNS TABLE (
    vote_id       uuid,
    poll_id       uuid,
    outcome       text,
    version       bigint,
    total_ballots bigint,
    option_ids    uuid[],
    votes         bigint[]
)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    -- A vote of another poll would be written where this poll's rows live.
    IF p_poll_id IS NULL
       OR EXISTS (SELECT FROM unnest(p_votes) AS v WHERE v.poll_id IS DISTINCT FROM p_poll_id)
    THEN
        RAISE EXCEPTION 'cast_poll_votes: every vote must name the poll %',
            coalesce(p_poll_id::text, 'null')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY SELECT * FROM cast_votes(ARRAY[p_poll_id], p_votes);
END
$$;
