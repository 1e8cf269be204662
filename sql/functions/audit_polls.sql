-- sql/functions/audit_polls.sql: what `voteflow audit` reads from PostgreSQL.

-- Every poll (or only p_poll_id), its live tallies beside a recount from the
-- votes table (rule 7), and for single-vote polls how voter_ballots agrees
-- with the counted votes (rule 2). One statement, so one snapshot; and
-- cast_vote_atomic changes votes, voter_ballots, tallies and poll_counters in
-- one transaction, so every row must agree with itself at any moment, whether
-- the streams are drained or not. The votes table is read twice (recount, and
-- counted votes against voter_ballots), whatever the number of polls.
CREATE OR REPLACE FUNCTION audit_polls(p_poll_id uuid DEFAULT NULL)
RETURNS TABLE (
    poll_id              uuid,
    allow_multiple_votes boolean,
    -- poll_counters; null when the poll has no counters row
    version              bigint,
    total_ballots        bigint,
    -- counted votes in the votes table
    recount_ballots      bigint,
    -- The poll's options in option order, then any option id found only in
    -- tallies or in counted votes (cast_vote_atomic records none); per option
    -- the live votes (null: no tallies row) and the recount.
    option_ids           uuid[],
    votes                bigint[],
    recount_votes        bigint[],
    -- Single-vote polls only (0 otherwise): counted votes that are not their
    -- voter's current ballot in voter_ballots (which includes every counted
    -- vote beyond one per voter).
    not_current          bigint,
    -- voter_ballots rows that are not a counted vote of their voter, and rows
    -- whose options differ from their vote's.
    current_not_counted  bigint,
    options_differ       bigint
)
LANGUAGE sql
STABLE
AS $$
    WITH poll AS (
        SELECT p.id, p.allow_multiple_votes
        FROM polls AS p
        WHERE p_poll_id IS NULL OR p.id = p_poll_id
    ),
    recount AS (
        SELECT v.poll_id, u.option_id, count(*) AS votes
        FROM votes AS v CROSS JOIN LATERAL unnest(v.option_ids) AS u(option_id)
        WHERE v.counted AND (p_poll_id IS NULL OR v.poll_id = p_poll_id)
        GROUP BY v.poll_id, u.option_id
    ),
    per_option AS (
        SELECT coalesce(o.poll_id, t.poll_id, r.poll_id) AS poll_id,
               coalesce(o.id, t.option_id, r.option_id) AS option_id,
               o.position,
               t.votes AS live,
               coalesce(r.votes, 0) AS recount
        FROM (SELECT * FROM options AS o WHERE p_poll_id IS NULL OR o.poll_id = p_poll_id) AS o
        FULL JOIN (SELECT * FROM tallies AS t WHERE p_poll_id IS NULL OR t.poll_id = p_poll_id)
               AS t ON t.poll_id = o.poll_id AND t.option_id = o.id
        FULL JOIN recount AS r
               ON r.poll_id = coalesce(o.poll_id, t.poll_id)
              AND r.option_id = coalesce(o.id, t.option_id)
    ),
    per_poll AS (
        SELECT x.poll_id,
               array_agg(x.option_id ORDER BY x.position NULLS LAST, x.option_id) AS option_ids,
               array_agg(x.live ORDER BY x.position NULLS LAST, x.option_id) AS votes,
               array_agg(x.recount ORDER BY x.position NULLS LAST, x.option_id) AS recount_votes
        FROM per_option AS x
        GROUP BY x.poll_id
    ),
    -- Each counted vote beside its voter's current ballot: in a single-vote
    -- poll the two must be the same ballot, one for one.
    ballots AS (
        SELECT coalesce(v.poll_id, b.poll_id) AS poll_id,
               count(v.vote_id) AS counted,
               count(*) FILTER (WHERE b.vote_id IS NULL) AS not_current,
               count(*) FILTER (WHERE v.vote_id IS NULL) AS current_not_counted,
               count(*) FILTER (WHERE v.option_ids <> b.option_ids) AS options_differ
        FROM (
            SELECT v.poll_id, v.vote_id, v.voter, v.option_ids
            FROM votes AS v
            WHERE v.counted AND (p_poll_id IS NULL OR v.poll_id = p_poll_id)
        ) AS v
        FULL JOIN (
            SELECT b.poll_id, b.vote_id, b.voter, b.option_ids
            FROM voter_ballots AS b
            WHERE p_poll_id IS NULL OR b.poll_id = p_poll_id
        ) AS b ON b.poll_id = v.poll_id AND b.voter = v.voter AND b.vote_id = v.vote_id
        GROUP BY 1
    )
    SELECT p.id, p.allow_multiple_votes, c.version, c.total_ballots,
           coalesce(b.counted, 0),
           coalesce(a.option_ids, '{}'), coalesce(a.votes, '{}'), coalesce(a.recount_votes, '{}'),
           CASE WHEN p.allow_multiple_votes THEN 0 ELSE coalesce(b.not_current, 0) END,
           coalesce(b.current_not_counted, 0),
           coalesce(b.options_differ, 0)
    FROM poll AS p
    LEFT JOIN poll_counters AS c ON c.poll_id = p.id
    LEFT JOIN per_poll AS a ON a.poll_id = p.id
    LEFT JOIN ballots AS b ON b.poll_id = p.id
    ORDER BY p.id
$$;
