-- sql/functions/create_poll.sql: a new poll, in one call.

-- Creates a poll with its options (position = index in p_labels), a zero tally
-- per option and its counters row; returns the poll's id. The HTTP edge
-- validates first; these checks are the last line of defence.
CREATE OR REPLACE FUNCTION create_poll(
    p_question text,
    p_labels text[],
    p_allow_multiple boolean,
    p_max_choices int,
    p_expires_at timestamptz
) RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    n int := coalesce(cardinality(p_labels), 0);
    new_poll_id uuid;
BEGIN
    IF p_question IS NULL OR length(p_question) NOT BETWEEN 1 AND 500 THEN
        RAISE EXCEPTION 'create_poll: the question must have 1 to 500 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF n NOT BETWEEN 2 AND 64 OR array_ndims(p_labels) <> 1 THEN
        RAISE EXCEPTION 'create_poll: a poll needs 2 to 64 option labels, got %', n
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM unnest(p_labels) AS l WHERE l IS NULL OR length(l) NOT BETWEEN 1 AND 200)
    THEN
        RAISE EXCEPTION 'create_poll: each option label must have 1 to 200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_allow_multiple IS NULL THEN
        RAISE EXCEPTION 'create_poll: p_allow_multiple must not be null'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_choices IS NULL OR p_max_choices NOT BETWEEN 1 AND n THEN
        RAISE EXCEPTION 'create_poll: max_choices must be between 1 and the number of options (%), got %',
            n, coalesce(p_max_choices::text, 'null')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    INSERT INTO polls (question, allow_multiple_votes, max_choices, expires_at)
    VALUES (p_question, p_allow_multiple, p_max_choices, p_expires_at)
    RETURNING id INTO new_poll_id;

    WITH inserted AS (
        INSERT INTO options (poll_id, position, label)
        SELECT new_poll_id, l.position, l.label
        FROM unnest(p_labels) WITH ORDINALITY AS l(label, position)
        RETURNING id
    )
    INSERT INTO tallies (poll_id, option_id)
    SELECT new_poll_id, inserted.id FROM inserted;

    INSERT INTO poll_counters (poll_id) VALUES (new_poll_id);
    RETURN new_poll_id;
END
$$;
