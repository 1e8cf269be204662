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

