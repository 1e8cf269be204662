"""voteflow on a Redis Cluster (VOTEFLOW_REDIS_CLUSTER): three masters started
by the test from the same server binary `voteflow up` uses.

The edge and the worker run in the test's loop here; the failover test, with
processes and replicas, is in test_redis_failover.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import RedisCluster
from redis.exceptions import MaxConnectionsError

from tests.support import (
    InProcessWorker,
    create_poll,
    drain,
    edge_client,
    next_event,
    recount,
    results,
    shell_env,
)
from voteflow.audit import audit
from voteflow.keys import Keys
from voteflow.message import Vote
from voteflow.redisconn import ClusterClient
from voteflow.settings import Settings

Client = TestClient[Any, Any]


@pytest.fixture
async def cluster_client(on_cluster: Settings) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(on_cluster.redis_url)
    await client.initialize()
    yield client
    await client.aclose()


async def _vote(
    edge: Client, poll: dict[str, Any], voter: str, option: int = 0, **extra: Any
) -> Any:
    body = {
        "poll_id": poll["id"],
        "option_ids": [poll["options"][option]["id"]],
        "voter_fingerprint": voter,
        **extra,
    }
    return await edge.post("/api/vote", json=body)


async def test_the_stream_shards_spread_over_every_master(
    on_cluster: Settings, cluster_client: RedisCluster
) -> None:
    keys = Keys(on_cluster.key_prefix, on_cluster.stream_shards, cluster=True)
    holders: dict[str, int] = {}
    for stream in keys.streams():
        node = cluster_client.get_node_from_key(stream)
        assert node is not None
        holders[node.name] = holders.get(node.name, 0) + 1
    masters = {node.name for node in cluster_client.get_primaries()}
    assert set(holders) == masters
    # 8 shards over 3 masters: 3, 3 and 2, never 4 on one.
    assert sorted(holders.values()) == [2, 3, 3]


async def test_votes_through_a_cluster_are_counted_exactly_once(
    on_cluster: Settings, cluster_client: RedisCluster
) -> None:
    async with edge_client(on_cluster) as edge, InProcessWorker(on_cluster):
        poll = await create_poll(edge)
        sent: dict[str, int] = {}
        for n in range(240):
            vote_id = str(uuid.uuid4())
            response = await _vote(edge, poll, f"voter-{n}", n % 3, vote_id=vote_id)
            assert response.status == 202, await response.text()
            sent[vote_id] = n % 3
        # Retries of accepted votes are answered 202 and counted once.
        for vote_id, option in list(sent.items())[:40]:
            voter = f"voter-{list(sent).index(vote_id)}"
            assert (await _vote(edge, poll, voter, option, vote_id=vote_id)).status == 202
        await drain(cluster_client, on_cluster)
        counted = await results(edge, poll["id"])
    expected = {poll["options"][i]["id"]: list(sent.values()).count(i) for i in range(3)}
    assert {o["id"]: o["votes"] for o in counted["options"]} == expected
    assert counted["total_ballots"] == 240
    assert await recount(on_cluster.database_url, poll["id"]) == expected
    # Every master took appends: the votes were spread, not funnelled to one.
    keys = Keys(on_cluster.key_prefix, on_cluster.stream_shards, cluster=True)
    appended: dict[str, int] = {}
    for stream in keys.streams():
        node = cluster_client.get_node_from_key(stream)
        assert node is not None
        info = await cluster_client.xinfo_stream(stream)
        appended[node.name] = appended.get(node.name, 0) + info["entries-added"]
    assert len(appended) == 3 and all(n > 0 for n in appended.values())


async def test_a_voters_limit_holds_exactly_on_a_cluster(on_cluster: Settings) -> None:
    limited = dataclasses.replace(on_cluster, rate_limit_per_voter=3)
    async with edge_client(limited) as edge:
        poll = await create_poll(edge)
        statuses = [(await _vote(edge, poll, "eager")).status for _ in range(5)]
    assert statuses == [202, 202, 202, 429, 429]


async def test_an_address_gets_its_limit_in_shares_over_the_shards(on_cluster: Settings) -> None:
    # 16 a minute over 8 shards: 2 per shard. One address, many voters.
    limited = dataclasses.replace(on_cluster, rate_limit_per_ip=16)
    keys = Keys(on_cluster.key_prefix, on_cluster.stream_shards, cluster=True)
    async with edge_client(limited) as edge:
        poll = await create_poll(edge)
        voters = [f"office-{n}" for n in range(64)]
        statuses = [(await _vote(edge, poll, voter)).status for voter in voters]
    per_shard: dict[int, int] = {}
    for voter, status in zip(voters, statuses, strict=True):
        if status == 202:
            shard = Vote("", "", f"f:{voter}", (), 0).shard(keys.shards)
            per_shard[shard] = per_shard.get(shard, 0) + 1
    assert statuses.count(202) == 16
    assert set(statuses) == {202, 429}
    assert all(n == 2 for n in per_shard.values())


async def test_live_tallies_reach_watchers_over_sharded_pubsub(on_cluster: Settings) -> None:
    async with edge_client(on_cluster) as edge, InProcessWorker(on_cluster):
        polls = [await create_poll(edge) for _ in range(3)]
        for poll in polls:
            async with edge.get(f"/api/polls/{poll['id']}/live") as response:
                first = await next_event(response)
                assert first["total_ballots"] == 0
                assert (await _vote(edge, poll, "watcher")).status == 202
                update = await next_event(response)
                assert update["total_ballots"] == 1


async def test_without_enough_replicas_a_vote_is_not_confirmed(on_cluster: Settings) -> None:
    # These masters have no replicas: WAIT can never confirm one.
    wanting = dataclasses.replace(on_cluster, redis_min_replicas=1)
    async with edge_client(wanting) as edge:
        poll = await create_poll(edge)
        response = await _vote(edge, poll, "careful")
        assert response.status == 503, await response.text()
        assert "Retry-After" in response.headers
        metrics = await (await edge.get("/metrics")).text()
    assert "voteflow_append_unreplicated_total 1.0" in metrics


async def test_the_audit_checks_a_cluster_and_names_each_shards_master(
    on_cluster: Settings, cluster_client: RedisCluster
) -> None:
    async with edge_client(on_cluster) as edge, InProcessWorker(on_cluster):
        poll = await create_poll(edge)
        for n in range(30):
            assert (await _vote(edge, poll, f"audited-{n}")).status == 202
        await drain(cluster_client, on_cluster)
    report = await audit(on_cluster)
    assert report.problems == []
    masters = {node.name for node in cluster_client.get_primaries()}
    assert {shard.node for shard in report.shards} == masters
    assert all(f", on {shard.node}" in shard.line() for shard in report.shards)


async def test_a_vote_id_reused_by_a_voter_of_another_shard_is_409(
    on_cluster: Settings, cluster_client: RedisCluster
) -> None:
    """Each voter's append goes to its own shard's master; the vote_id's claim,
    in the vote_id's own slot, still finds the reuse."""
    keys = Keys(on_cluster.key_prefix, on_cluster.stream_shards, cluster=True)
    async with edge_client(on_cluster) as edge:
        poll = await create_poll(edge, allow_multiple_votes=True)
        vote_id = str(uuid.uuid4())
        first = Vote(vote_id, poll["id"], "f:ann", (), 0).shard(keys.shards)
        other = next(
            f"v{n}"
            for n in range(100)
            if Vote(vote_id, poll["id"], f"f:v{n}", (), 0).shard(keys.shards) != first
        )
        assert (await _vote(edge, poll, "ann", vote_id=vote_id)).status == 202
        assert (await _vote(edge, poll, "ann", vote_id=vote_id)).status == 202  # a retry
        response = await _vote(edge, poll, other, vote_id=vote_id)
        assert response.status == 409
        assert (await _vote(edge, poll, "ann", 1, vote_id=vote_id)).status == 409
        async with InProcessWorker(on_cluster):
            await drain(cluster_client, on_cluster)
        assert (await results(edge, poll["id"]))["total_ballots"] == 1


async def test_a_node_with_no_connection_left_is_renewed_not_stuck(on_cluster: Settings) -> None:
    # redis-py 5 can keep a connection it failed to write on counted as in use
    # (redis-py issue 4110): here every connection of one node is taken and
    # never given back, as a failover left them for a worker that then stayed
    # stuck. The command that meets it fails; the next finds new nodes.
    client = ClusterClient.from_url(on_cluster.redis_url, max_connections=2)
    key = f"{on_cluster.key_prefix}:renewed"
    try:
        await client.set(key, "1")
        node = client.get_node_from_key(key)
        with pytest.raises(MaxConnectionsError):
            while True:
                node.acquire_connection()
        with pytest.raises(MaxConnectionsError):
            await client.get(key)
        assert await client.get(key) == b"1"
    finally:
        await client.delete(key)
        await client.aclose()


async def test_arq_s_own_entry_point_runs_a_worker_on_a_cluster(
    on_cluster: Settings, cluster_client: RedisCluster
) -> None:
    """`arq workers.WorkerSettings` is a voteflow worker as `voteflow worker`
    is: arq's job-finishing transaction (the reclaim job, run at start-up) keeps
    to one slot, and the votes are written."""
    env = shell_env(
        VOTEFLOW_DATABASE_URL=on_cluster.database_url,
        VOTEFLOW_REDIS_URL=on_cluster.redis_url,
        VOTEFLOW_REDIS_CLUSTER="true",
        VOTEFLOW_STREAM_SHARDS=str(on_cluster.stream_shards),
        VOTEFLOW_KEY_PREFIX=on_cluster.key_prefix,
        VOTEFLOW_WORKER_METRICS_PORT="0",
    )
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "arq", "workers.WorkerSettings",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert worker.stdout is not None
    lines: list[str] = []

    async def read(stream: asyncio.StreamReader) -> None:
        async for line in stream:
            lines.append(line.decode())

    reader = asyncio.create_task(read(worker.stdout))
    try:
        async with edge_client(on_cluster) as edge:
            poll = await create_poll(edge)
            for voter in ("ann", "bob", "cat"):
                assert (await _vote(edge, poll, voter, 1)).status == 202
            # The worker may still be starting (no consumer group yet): wait
            # for the count itself, and for the start-up run of the reclaim job
            # to finish (arq logs "← <job> ●" when it finished, a cross when it failed).
            async with asyncio.timeout(30):
                while (await results(edge, poll["id"]))["total_ballots"] < 3 or not any(
                    re.search(r"← \S*reclaim [●x\u00d7]", line) for line in lines
                ):
                    await asyncio.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 30)
        await reader
    output = "".join(lines)
    assert re.search(r"← \S*reclaim ●", output), output
    assert "CROSSSLOT" not in output and "Traceback" not in output, output
    assert worker.returncode == 0, output
