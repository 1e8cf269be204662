-- 0006_poll_keys.sql: every key of a table a vote touches includes the poll.
--
-- So that the schema can be distributed by poll (Citus, sql/citus/): a
-- distributed table's primary and unique keys must include its distribution
-- column, and a foreign key between two distributed tables must include it on
-- both sides. Only options and the tallies' reference to it lacked the poll;
-- votes, voter_ballots, tallies and poll_counters were keyed by poll already.
--
-- Nothing a user sees changes: option ids still come from gen_random_uuid(),
-- every option is still found by its poll (create_poll, cast_vote_atomic,
-- poll_get, poll_tally, poll_recount all read options by poll_id), and a
-- tally row must now name an option of its own poll, which create_poll has
-- always done.

-- The tallies' reference to options is rebuilt on (poll_id, id) below; the old
-- one depends on the index of options' primary key.
ALTER TABLE tallies DROP CONSTRAINT tallies_option_id_fkey;

ALTER TABLE options DROP CONSTRAINT options_pkey;
ALTER TABLE options ADD CONSTRAINT options_pkey PRIMARY KEY (poll_id, id);

ALTER TABLE tallies
    ADD CONSTRAINT tallies_poll_id_option_id_fkey
    FOREIGN KEY (poll_id, option_id) REFERENCES options (poll_id, id) ON DELETE CASCADE;
