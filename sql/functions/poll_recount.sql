-- sql/functions/poll_recount.sql: a poll recounted from the vote log alone, for
-- `voteflow audit` (rule 7).

-- A recount of a poll from the vote log alone: counted votes per option. Every
-- option of the poll appears (zero if no counted vote names it), in option
-- order; an option id found in votes but not among the poll's options (which
-- cast_vote_atomic never records) would appear last, so an audit sees it.
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

-- The number of counted ballots of a poll, from the vote log alone (compare
-- with poll_counters.total_ballots).
CREATE OR REPLACE FUNCTION poll_recount_ballots(p_poll_id uuid) RETURNS bigint
LANGUAGE plpgsql
STABLE
AS $$
BEGIN
    RETURN (SELECT count(*) FROM votes AS v WHERE v.poll_id = p_poll_id AND v.counted);
END
$$;
