-- 0001_schema.sql: polls, their options, live tallies and the vote log.
--
-- Applied by voteflow.migrate, which sets the custom setting
-- voteflow.vote_partitions (the number of hash partitions of votes and
-- voter_ballots) for this transaction before running the file.

CREATE TABLE polls (
    id                   uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    question             text        NOT NULL CHECK (length(question) BETWEEN 1 AND 500),
    -- false: one counted ballot per voter, a later ballot replaces the earlier.
    allow_multiple_votes boolean     NOT NULL DEFAULT false,
    -- How many options one ballot may name (max_choices <= number of options
    -- is checked by create_poll).
    max_choices          int         NOT NULL DEFAULT 1 CHECK (max_choices >= 1),
    -- A vote received at or after expires_at, or after closed_at, is recorded
    -- but not counted.
    expires_at           timestamptz NULL,
    closed_at            timestamptz NULL,
    created_at           timestamptz NOT NULL DEFAULT now()
);

-- Listing polls newest first, paginated by (created_at, id).
CREATE INDEX polls_created_at_id_idx ON polls (created_at DESC, id);

CREATE TABLE options (
    id       uuid     PRIMARY KEY DEFAULT gen_random_uuid(),
    poll_id  uuid     NOT NULL REFERENCES polls ON DELETE CASCADE,
    -- 1-based, the option's index in create_poll's p_labels.
    position smallint NOT NULL CHECK (position >= 1),
    label    text     NOT NULL CHECK (length(label) BETWEEN 1 AND 200),
    UNIQUE (poll_id, position)
);

-- The live count of each option, kept by cast_vote_atomic. fillfactor leaves
-- room on each page so that the constant updates of these few hot rows are
-- HOT updates (no index churn, pruned in place).
CREATE TABLE tallies (
    poll_id   uuid   NOT NULL REFERENCES polls ON DELETE CASCADE,
    option_id uuid   NOT NULL REFERENCES options ON DELETE CASCADE,
    votes     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (poll_id, option_id)
) WITH (fillfactor = 50);

-- total_ballots counts counted ballots; version grows by one with every
-- committed batch that changed the poll's tallies, so readers of published
-- tallies can drop a stale one.
CREATE TABLE poll_counters (
    poll_id       uuid        PRIMARY KEY REFERENCES polls ON DELETE CASCADE,
    total_ballots bigint      NOT NULL DEFAULT 0,
    version       bigint      NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

-- Every vote that was accepted into PostgreSQL, exactly once (primary key),
-- including replaced ones and ones received after the poll closed: those have
-- counted = false. The tallies can be recounted from this table alone
-- (poll_recount).
--
-- No foreign key to polls: it would cost one index lookup (and a row lock on
-- the poll) per inserted vote on the hot path; cast_vote_atomic checks that
-- the poll exists before it records a vote.
--
-- voter is compared and sorted bytewise (COLLATE "C"): voter keys are opaque
-- identifiers, and the lock order of cast_vote_atomic must not depend on a
-- locale.
CREATE TABLE votes (
    poll_id      uuid        NOT NULL,
    vote_id      uuid        NOT NULL,
    voter        text        COLLATE "C" NOT NULL,
    option_ids   uuid[]      NOT NULL,
    -- When the edge received the vote: decides "later" between two ballots.
    received_at  timestamptz NOT NULL,
    counted      boolean     NOT NULL,
    -- Start of the transaction that recorded the vote.
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (poll_id, vote_id)
) PARTITION BY HASH (poll_id);

-- The current ballot of each voter of a single-vote poll (the latest by
-- (received_at, vote_id) of the voter's recorded, not-closed ballots). Also
-- the per-voter lock cast_vote_atomic takes to replace a ballot. No foreign
-- key to polls, for the same reason as votes.
CREATE TABLE voter_ballots (
    poll_id     uuid        NOT NULL,
    voter       text        COLLATE "C" NOT NULL,
    vote_id     uuid        NOT NULL,
    received_at timestamptz NOT NULL,
    option_ids  uuid[]      NOT NULL,
    PRIMARY KEY (poll_id, voter)
) PARTITION BY HASH (poll_id);

DO $$
DECLARE
    setting text := current_setting('voteflow.vote_partitions', true);
    n int;
BEGIN
    IF coalesce(setting, '') ~ '^[0-9]{1,4}$' THEN
        n := setting::int;
    END IF;
    IF coalesce(n, 0) < 1 THEN
        RAISE EXCEPTION 'voteflow.vote_partitions must be set to an integer from 1 to 9999, got %',
            coalesce(quote_literal(setting), 'nothing')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Apply migrations with voteflow.migrate.migrate().';
    END IF;
    FOR i IN 0 .. n - 1 LOOP
        EXECUTE format(
            'CREATE TABLE votes_p%s PARTITION OF votes FOR VALUES WITH (MODULUS %s, REMAINDER %s)',
            i, n, i);
        EXECUTE format(
            'CREATE TABLE voter_ballots_p%s PARTITION OF voter_ballots'
            ' FOR VALUES WITH (MODULUS %s, REMAINDER %s)',
            i, n, i);
    END LOOP;
END
$$;

-- Creates a poll with its options (position = index in p_labels), a zero tally
-- per option and its counters row; returns the poll's id. The HTTP edge
-- validates first; these checks are the last line of defence.
CREATE FUNCTION create_poll(
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

-- Closes a poll at p_closed_at, or later if batches in flight hold it, unless
-- it is closed already (the first close time stays). Returns false if the
-- poll does not exist.
CREATE FUNCTION close_poll(p_poll_id uuid, p_closed_at timestamptz) RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_closed_at IS NULL THEN
        RAISE EXCEPTION 'close_poll: p_closed_at must not be null'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Wait for the batches that read the poll open (they hold it FOR SHARE)
    -- to commit; from then on every batch sees closed_at. The close takes
    -- effect no earlier than that moment, so no vote those batches counted was
    -- received after closed_at (rule 6).
    PERFORM FROM polls WHERE id = p_poll_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE polls SET closed_at = greatest(p_closed_at, clock_timestamp())
    WHERE id = p_poll_id AND closed_at IS NULL;
    RETURN true;
END
$$;

-- A recount of a poll from the vote log alone: counted votes per option. Every
-- option of the poll appears (zero if no counted vote names it), in option
-- order; an option id found in votes but not among the poll's options (which
-- cast_vote_atomic never records) would appear last, so an audit sees it.
CREATE FUNCTION poll_recount(p_poll_id uuid)
RETURNS TABLE (option_id uuid, votes bigint)
LANGUAGE sql
STABLE
AS $$
    SELECT coalesce(o.id, c.option_id), coalesce(c.votes, 0)
    FROM (SELECT id, position FROM options WHERE poll_id = p_poll_id) AS o
    FULL JOIN (
        SELECT u.option_id, count(*) AS votes
        FROM votes AS v CROSS JOIN LATERAL unnest(v.option_ids) AS u(option_id)
        WHERE v.poll_id = p_poll_id AND v.counted
        GROUP BY u.option_id
    ) AS c ON c.option_id = o.id
    ORDER BY o.position NULLS LAST, 1
$$;

-- The number of counted ballots of a poll, from the vote log alone (compare
-- with poll_counters.total_ballots).
CREATE FUNCTION poll_recount_ballots(p_poll_id uuid) RETURNS bigint
LANGUAGE sql
STABLE
AS $$
    SELECT count(*) FROM votes WHERE poll_id = p_poll_id AND counted
$$;
