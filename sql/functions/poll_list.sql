-- sql/functions/poll_list.sql: the polls by state (open, closed, or all),
-- newest first, a page at a time, with each poll's counted ballots:
-- GET /api/polls?state=, the page at / and the organizer's page.
--
-- Pages are cut by keyset, not OFFSET: a page starts after the (created_at,
-- id) of the previous page's last poll, so each page is one index range scan
-- however deep the reader goes, and a poll created meanwhile shifts nothing.
--
-- A poll is closed once its closed_at or its expires_at has passed, as
-- Poll.is_open says on the edge.

CREATE OR REPLACE FUNCTION poll_list(
    p_state text, p_before_created timestamptz, p_before_id uuid, p_limit int
)
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
    require_voter_token boolean,
    total_ballots bigint
)
LANGUAGE sql
STABLE
AS $$
    SELECT p.id, p.question, p.allow_multiple_votes, p.max_choices, p.expires_at,
           p.closed_at, p.created_at, o.option_ids, o.labels, p.require_voter_token,
           coalesce(c.total_ballots, 0)
    FROM (
        SELECT q.*
        FROM polls AS q
        CROSS JOIN LATERAL (
            SELECT (q.closed_at IS NULL OR q.closed_at > now())
               AND (q.expires_at IS NULL OR q.expires_at > now()) AS is_open
        ) AS s
        WHERE (p_before_created IS NULL
               OR (q.created_at, q.id) < (p_before_created, p_before_id))
          AND CASE p_state
                  WHEN 'open' THEN s.is_open
                  WHEN 'closed' THEN NOT s.is_open
                  WHEN 'all' THEN true
              END
        ORDER BY q.created_at DESC, q.id DESC
        LIMIT p_limit
    ) AS p
    CROSS JOIN LATERAL (
        SELECT array_agg(x.id ORDER BY x.position) AS option_ids,
               array_agg(x.label ORDER BY x.position) AS labels
        FROM options AS x
        WHERE x.poll_id = p.id
    ) AS o
    LEFT JOIN poll_counters AS c ON c.poll_id = p.id
    ORDER BY p.created_at DESC, p.id DESC
$$;
