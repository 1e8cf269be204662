-- 0002_cast_vote_atomic.sql: the types of the call that writes a batch of
-- votes. The call itself, its rules and its lock order are in
-- sql/functions/cast_votes.sql and sql/functions/cast_vote_atomic.sql.

-- One vote as a worker passes it. received_us: microseconds since the Unix
-- epoch at which the edge received the vote.
CREATE TYPE vote_in AS (
    vote_id     uuid,
    poll_id     uuid,
    voter       text,
    option_ids  uuid[],
    received_us bigint
);

-- Internal to cast_votes: one input vote and what has been decided
-- about it so far.
CREATE TYPE cast_vote_work AS (
    ord         int,          -- position in the input array, from 1
    vote_id     uuid,
    poll_id     uuid,
    voter       text COLLATE "C",
    option_ids  uuid[],
    received_at timestamptz,
    single      boolean,      -- the poll allows one ballot per voter
    closed      boolean,      -- received after the poll closed or expired
    latest      boolean,      -- the batch's latest ballot of this (poll, voter)
    outcome     text          -- null while undecided; 'pending': see phase (b)
);

