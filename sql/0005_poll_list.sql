-- The open polls, newest first, a page at a time, for the edge's poll list
-- (GET /api/polls and the page at /).
--
-- Pages are cut by keyset, not OFFSET: a page starts after the (created_at,
-- id) of the previous page's last poll, so each page is one index range scan
-- however deep the reader goes, and a poll created meanwhile shifts nothing.

-- Matches the list's order exactly (both columns descending), so the keyset
-- condition and the ORDER BY walk one index range.
CREATE INDEX polls_created_at_desc_id_desc_idx ON polls (created_at DESC, id DESC);
DROP INDEX polls_created_at_id_idx;

-- Up to p_limit open polls created before (p_before_created, p_before_id),
-- newest first, each with its options in option order; from the newest when
-- p_before_created is NULL.
CREATE FUNCTION poll_list(p_before_created timestamptz, p_before_id uuid, p_limit int)
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
LANGUAGE sql
STABLE
AS $$
    SELECT p.id, p.question, p.allow_multiple_votes, p.max_choices, p.expires_at,
           p.closed_at, p.created_at, o.option_ids, o.labels
    FROM (
        SELECT *
        FROM polls AS q
        WHERE (p_before_created IS NULL
               OR (q.created_at, q.id) < (p_before_created, p_before_id))
          AND (q.closed_at IS NULL OR q.closed_at > now())
          AND (q.expires_at IS NULL OR q.expires_at > now())
        ORDER BY q.created_at DESC, q.id DESC
        LIMIT p_limit
    ) AS p
    CROSS JOIN LATERAL (
        SELECT array_agg(x.id ORDER BY x.position) AS option_ids,
               array_agg(x.label ORDER BY x.position) AS labels
        FROM options AS x
        WHERE x.poll_id = p.id
    ) AS o
    ORDER BY p.created_at DESC, p.id DESC
$$;
