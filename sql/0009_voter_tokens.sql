-- 0009_voter_tokens.sql: polls that take only voters proven by a signed voter
-- token (README, "Voter tokens"). The edge enforces it on admission; the
-- flag is stored with the poll so that every edge, and the poll's JSON, agree.

ALTER TABLE polls ADD COLUMN require_voter_token boolean NOT NULL DEFAULT false;

-- poll_get and poll_list return the flag too. A function's result columns
-- cannot change in place, so each is dropped and created again; these bodies
-- supersede those of 0008 (poll_get) and 0005 (poll_list), and differ from
-- them only by the new column. (A Citus database distributed before this
-- migration runs sql/citus/0002_functions.sql again after it: dropping
-- poll_get dropped its delegation; docs/scaling.md.)
DROP FUNCTION poll_get(uuid);
CREATE FUNCTION poll_get(p_poll_id uuid)
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

DROP FUNCTION poll_list(timestamptz, uuid, int);
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
    labels text[],
    require_voter_token boolean
)
LANGUAGE sql
STABLE
AS $$
    SELECT p.id, p.question, p.allow_multiple_votes, p.max_choices, p.expires_at,
           p.closed_at, p.created_at, o.option_ids, o.labels, p.require_voter_token
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
