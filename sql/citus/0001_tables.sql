-- sql/citus/0001_tables.sql: voteflow's tables on Citus, all distributed by
-- poll and co-located, so that everything one poll's votes touch lives on one
-- worker node. Applied once on the coordinator, after the migrations
-- (sql/NNNN_*.sql), before any data: docs/scaling.md gives the steps.
--
-- Why no reference table: cast_poll_votes reads its poll FOR SHARE (so that
-- close_poll waits for the batches in flight, rule 6). On a reference table
-- Citus turns a row lock into a lock on the whole table, taken first on the
-- first worker node: one more network round trip per batch, and every poll
-- creation or close would wait for every batch in flight in the cluster.
-- Distributed by its id, a poll's row lock stays a row lock on the node of
-- its votes. Options are read only with their poll, never across polls, and a
-- reference table could not keep its foreign key to polls (Citus refuses
-- foreign keys from a reference table to a distributed one). The edge reads
-- polls through its cache, so their placement costs it nothing per vote.
--
-- Foreign keys' targets are distributed first, as Citus requires. votes and
-- voter_ballots are hash-partitioned tables: Citus distributes the parent and
-- its partitions with it (each shard keeps the partitions).
-- schema_migrations and schema_functions stay local tables of the
-- coordinator, where `voteflow migrate` runs.

-- poll_counters carries the trigger that keeps tally_history (0011): Citus
-- distributes a table with a trigger only with this on. The trigger is safe
-- as Citus means it: it writes only the row of its own poll, in a co-located
-- shard on the same node.
SET citus.enable_unsafe_triggers = on;

-- polls.id is the poll id: the distribution column of the group.
SELECT create_distributed_table('polls', 'id', colocate_with := 'none');
SELECT create_distributed_table('options', 'poll_id', colocate_with := 'polls');
SELECT create_distributed_table('tallies', 'poll_id', colocate_with := 'polls');
SELECT create_distributed_table('poll_counters', 'poll_id', colocate_with := 'polls');
SELECT create_distributed_table('votes', 'poll_id', colocate_with := 'polls');
SELECT create_distributed_table('voter_ballots', 'poll_id', colocate_with := 'polls');
SELECT create_distributed_table('tally_history', 'poll_id', colocate_with := 'polls');
