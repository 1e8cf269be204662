-- naive.sql: the tables of stage 3's naive baseline (loadtest/bench/baselines.py),
-- created by the bench in its own private database. Not a voteflow migration.
--
-- The design voteflow replaces: a vote is written straight to PostgreSQL by
-- the web process; a voter's earlier ballot is deleted, then the new one
-- inserted.

CREATE TABLE IF NOT EXISTS naive_polls (
    id          uuid        PRIMARY KEY,
    option_ids  uuid[]      NOT NULL,
    max_choices int         NOT NULL DEFAULT 1,
    closed_at   timestamptz NULL
);

CREATE TABLE IF NOT EXISTS naive_votes (
    vote_id     uuid        PRIMARY KEY,
    poll_id     uuid        NOT NULL,
    voter       text        NOT NULL,
    option_ids  uuid[]      NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- Finds the voter's earlier ballot for the DELETE.
CREATE INDEX IF NOT EXISTS naive_votes_poll_voter_idx ON naive_votes (poll_id, voter);
