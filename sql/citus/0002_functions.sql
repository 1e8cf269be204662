-- sql/citus/0002_functions.sql: the functions that run on worker nodes.
--
-- A function distributed by a poll argument is delegated: Citus runs the
-- whole call on the worker node holding that poll's shards, so all its
-- statements are local there. Citus delegates only a call made outside a
-- transaction block, as `SELECT * FROM f(...)` or `SELECT f(...)`.
--
-- Functions that cross polls (cast_vote_atomic, create_poll, poll_list,
-- audit_polls) stay on the coordinator, which routes each of their
-- statements by poll.

-- The rules, called by cast_poll_votes on the worker node: created on every
-- node, never delegated by itself.
SELECT create_distributed_function('cast_votes(uuid[], vote_in[])');

-- What the worker calls once per poll of a batch.
SELECT create_distributed_function(
    'cast_poll_votes(uuid, vote_in[])', 'p_poll_id', colocate_with := 'votes');

-- One poll at a time: the edge's reads, close, and the recount of an audit.
SELECT create_distributed_function('close_poll(uuid, timestamptz)', 'p_poll_id', colocate_with := 'polls');
SELECT create_distributed_function('poll_get(uuid)', 'p_poll_id', colocate_with := 'polls');
SELECT create_distributed_function('poll_tally(uuid)', 'p_poll_id', colocate_with := 'polls');
SELECT create_distributed_function('poll_recount(uuid)', 'p_poll_id', colocate_with := 'polls');
SELECT create_distributed_function('poll_recount_ballots(uuid)', 'p_poll_id', colocate_with := 'polls');
