"""Redis key names: each script's and transaction's keys share a slot on a
cluster, the stream shards spread over its masters, and one deployment's keys
never meet another's."""

from __future__ import annotations

import uuid

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from voteflow.keys import Keys, consumer, consumer_of


def _slot(key: str) -> int:
    return key_slot(key.encode())


@pytest.mark.parametrize("cluster", [False, True])
def test_what_one_append_touches_shares_the_shard_s_slot_on_a_cluster(cluster: bool) -> None:
    keys = Keys("vf", 8, cluster=cluster)
    vote_id = str(uuid.uuid4())
    for shard in range(8):
        # admit.lua: the stream, the vote_id's digest and both limiters;
        # ack.lua: the stream and its dead letters.
        appended = {
            keys.stream(shard),
            keys.dead_letters(shard),
            keys.vote_seen(shard, vote_id),
            keys.rate_ip("203.0.113.7", shard),
            keys.rate_ip("2001:db8::/64", shard),
            keys.rate_voter("f:phone", shard),
        }
        slots = {_slot(key) for key in appended}
        if cluster:
            assert slots == {_slot(keys.stream(shard))}
        assert len(appended) == 6  # and none is another's


def test_a_poll_s_snapshot_and_channel_share_a_slot_and_the_channel_names_the_poll() -> None:
    keys = Keys("vf", 8, cluster=True)
    poll = str(uuid.uuid4())
    assert _slot(keys.tally(poll)) == _slot(keys.tally_channel(poll))
    assert keys.poll_channel_id(keys.tally_channel(poll)) == poll
    assert keys.tally_channel(poll).startswith(keys.tally_channel_pattern().rstrip("*"))


def test_arq_s_keys_share_one_slot() -> None:
    keys = Keys("vf", 8, cluster=True)
    arq = {keys.arq_queue(), keys.arq_aborted(), keys.arq_health(), keys.arq_tag() + "job:x"}
    assert len({_slot(key) for key in arq}) == 1


@pytest.mark.parametrize("shards", [3, 4, 6, 8, 16, 64])
def test_stream_shards_spread_evenly_over_three_masters(shards: int) -> None:
    # As `redis-cli --cluster create` splits the slots: in three equal ranges.
    third = REDIS_CLUSTER_HASH_SLOTS / 3
    keys = Keys("vf", shards, cluster=True)
    per_master = [0, 0, 0]
    for shard in range(shards):
        per_master[int(_slot(keys.stream(shard)) // third)] += 1
    assert max(per_master) - min(per_master) <= 1, per_master


def test_a_vote_id_seen_on_one_redis_is_one_key_whatever_the_shard() -> None:
    keys = Keys("vf", 8)
    vote_id = str(uuid.uuid4())
    assert len({keys.vote_seen(shard, vote_id) for shard in range(8)}) == 1
    on_cluster = Keys("vf", 8, cluster=True)
    assert len({on_cluster.vote_seen(shard, vote_id) for shard in range(8)}) == 8


def test_two_deployments_with_their_own_prefixes_share_no_key() -> None:
    def every_key(keys: Keys) -> set[str]:
        poll, vote_id = "00000000-0000-4000-8000-000000000000", "v"
        names = {keys.tally(poll), keys.tally_channel(poll), keys.polls_changed_channel()}
        names |= {keys.arq_queue(), keys.arq_aborted(), keys.arq_health(), keys.vote_claim(vote_id)}
        for shard in range(keys.shards):
            names |= {keys.stream(shard), keys.dead_letters(shard)}
            names |= {keys.vote_seen(shard, vote_id), keys.rate_ip("192.0.2.1", shard)}
            names.add(keys.rate_voter("u:alice", shard))
        return names

    for cluster in (False, True):
        assert not every_key(Keys("room-a", 8, cluster)) & every_key(Keys("room-b", 8, cluster))


def test_a_consumer_name_says_whose_it_is() -> None:
    name = consumer("host-1", 4242, "a1b2c3")
    assert consumer_of(name, 4242) and consumer_of(name.encode(), 4242)
    # Another process, even one whose pid is a part of this one's.
    assert not consumer_of(name, 424) and not consumer_of(name, 42421)
    assert not consumer_of(consumer("4242", 1, "4242"), 4242)
