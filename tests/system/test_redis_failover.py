"""A Redis Cluster master dies while votes flow: its replica takes over, and the
edge and the worker (OS processes) carry on without a restart.

With VOTEFLOW_REDIS_MIN_REPLICAS=1 a 202 means a replica held the vote, so no
vote answered 202 is lost. With 0 a 202 means the master held it: votes it had
not yet passed to its replica die with it. The test reports how many, and
checks that any lost are of the dead master's shards only. (On one host the
replication stream leaves the master in the same event-loop turn as the
replies, so there are rarely any; across a network, or with a lagging
replica, there are.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import RedisCluster

from tests.cluster import (
    REQUEST_TIMEOUT,
    Cluster,
    create_poll,
    get_results,
    option_ids_of,
    stored_vote_ids,
    until,
)
from tests.support import drain, recount, votes_by_option
from voteflow.keys import Keys
from voteflow.message import Vote
from voteflow.servers import RedisClusterServers, RedisServer
from voteflow.settings import Settings

# Attempts a client makes for one vote (same vote_id) before it gives up.
ATTEMPTS = 60
RETRY_PAUSE = 0.1
# Votes per client at most, so that every loop is bounded.
MAX_VOTES_PER_CLIENT = 3000


@pytest.fixture
def six_nodes(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """3 masters with a replica each, every append written to disk (as `voteflow up`)."""
    with RedisClusterServers(tmp_path / "redis-cluster", masters=3, replicas=1) as servers:
        yield servers


@dataclass
class Voters:
    """Clients that vote on a multiple-vote poll and, like a well-behaved
    client, retry a vote answered 503 (or not answered) with its vote_id."""

    session: aiohttp.ClientSession
    url: str
    poll: dict[str, Any]
    accepted: dict[str, str] = field(default_factory=dict)  # vote_id -> option id
    voter_of: dict[str, str] = field(default_factory=dict)  # vote_id -> voter_fingerprint
    # vote_ids sent at least once but never answered 202
    abandoned: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    accepted_at: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, n: int) -> None:
        rng = random.Random(n)
        options = option_ids_of(self.poll)
        for _ in range(MAX_VOTES_PER_CLIENT):
            if self.stop.is_set():
                return
            vote_id, option = str(uuid.uuid4()), rng.choice(options)
            body = {
                "poll_id": self.poll["id"],
                "option_ids": [option],
                "voter_fingerprint": f"voter-{n}",
                "vote_id": vote_id,
            }
            self.abandoned.add(vote_id)
            self.voter_of[vote_id] = body["voter_fingerprint"]
            for _attempt in range(ATTEMPTS):
                if self.stop.is_set():
                    return  # this vote stays abandoned: never answered 202
                status = await self._send(body)
                self.statuses[status] += 1
                if status == 202:
                    self.abandoned.discard(vote_id)
                    self.accepted[vote_id] = option
                    self.accepted_at.append(time.monotonic())
                    break
                await asyncio.sleep(RETRY_PAUSE)

    async def _send(self, body: dict[str, Any]) -> int:
        try:
            async with self.session.post(f"{self.url}/api/vote", json=body) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return 0


async def _owner(servers: RedisClusterServers, key: str) -> str:
    """The address of the master that holds `key`, as the cluster says now."""
    client = RedisCluster.from_url(servers.url if servers.masters[0].pid else _alive(servers))
    try:
        await client.initialize()
        node = client.get_node_from_key(key)
        assert node is not None
        return str(node.name)
    finally:
        await client.aclose()


def _alive(servers: RedisClusterServers) -> str:
    return next(s.url for s in servers.servers if s.pid is not None)


def _server_at(servers: RedisClusterServers, address: str) -> RedisServer:
    return next(s for s in servers.servers if f"127.0.0.1:{s.port}" == address)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("min_replicas", [1, 0])
async def test_a_master_dies_its_replica_takes_over_and_the_pipeline_recovers(
    min_replicas: int, six_nodes: RedisClusterServers, settings: Settings, tmp_path: Path
) -> None:
    settings = dataclasses.replace(
        settings, redis_url=six_nodes.url, redis_cluster=True, stream_shards=8
    )
    keys = Keys(settings.key_prefix, settings.stream_shards, cluster=True)
    client = RedisCluster.from_url(six_nodes.url)
    await client.initialize()
    env = {
        "VOTEFLOW_REDIS_CLUSTER": "true",
        "VOTEFLOW_REDIS_MIN_REPLICAS": str(min_replicas),
        "VOTEFLOW_LOG_LEVEL": "DEBUG",
    }
    processes = Cluster(settings, tmp_path, client, env)
    try:
        (edge,), (worker,) = await processes.start(edges=1, workers=1)
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            poll = await create_poll(session, edge, ["A", "B", "C"], allow_multiple_votes=True)
            voters = Voters(session, edge.url, poll)
            sending = asyncio.gather(*(voters.client(n) for n in range(24)))
            try:
                await until(lambda: len(voters.accepted) >= 800, 60, "800 votes accepted")
                # The master holding arq's keys (and shards of the stream):
                # the worker's reclaim job must follow its failover too.
                doomed = await _owner(six_nodes, keys.arq_tag())
                doomed_shards = {
                    shard
                    for shard, stream in enumerate(keys.streams())
                    if await _owner(six_nodes, stream) == doomed
                }
                _server_at(six_nodes, doomed).kill()
                killed_at = time.monotonic()
                await until(_promoted(six_nodes, keys.arq_tag(), doomed), 30, "a replica took over")
                promoted_after = time.monotonic() - killed_at
                at_promotion = len(voters.accepted)
                await until(
                    lambda: len(voters.accepted) >= at_promotion + 800,
                    60,
                    "800 more votes accepted after the failover",
                )
            finally:
                voters.stop.set()
                async with asyncio.timeout(60):
                    await sending
            for process in (edge, worker):
                assert process.popen.poll() is None, process.log_tail()  # not restarted
            survivor = RedisCluster.from_url(_alive(six_nodes))
            await survivor.initialize()
            try:
                await drain(survivor, settings, timeout=60)
            except TimeoutError:
                groups = {s: await survivor.xinfo_groups(s) for s in keys.streams()}
                pytest.fail(f"not drained: {groups}\n{worker.log_tail(60)}")
            finally:
                await survivor.aclose()
            stored = await stored_vote_ids(settings.database_url, poll["id"])
            result = await get_results(session, edge, poll["id"])
    finally:
        problems = await processes.close()
        await client.aclose()
    assert not problems, "\n".join(problems)

    assert len(stored) == len(set(stored)), "a vote was counted twice"
    lost = set(voters.accepted) - set(stored)
    # A vote never answered 202 may or may not be counted (its client gave
    # up); anything else stored was answered 202.
    assert set(stored) <= set(voters.accepted) | voters.abandoned
    assert votes_by_option(result) == await recount(settings.database_url, poll["id"])
    assert result["total_ballots"] == len(stored)

    def shards(vote_ids: set[str]) -> set[int]:
        return {Vote("", "", f"f:{voters.voter_of[v]}", (), 0).shard(keys.shards) for v in vote_ids}

    shards_lost, shards_abandoned = shards(lost), shards(voters.abandoned)
    print(
        f"MIN_REPLICAS={min_replicas}: {len(voters.accepted)} votes answered 202, "
        f"{len(lost)} of them lost (shards {sorted(shards_lost)} of the dead master's "
        f"{sorted(doomed_shards)}); replica promoted {promoted_after:.1f}s after the kill; "
        f"answers {dict(voters.statuses)}; {len(voters.abandoned)} votes never answered 202 "
        f"(shards {sorted(shards_abandoned)})"
    )
    if min_replicas:
        assert not lost, f"{len(lost)} votes answered 202 were lost"
    # Whatever was lost was the dead master's: its shards, nothing else.
    assert shards_lost <= doomed_shards


def _promoted(servers: RedisClusterServers, key: str, dead: str) -> Any:
    async def check() -> bool:
        try:
            return await _owner(servers, key) != dead
        except Exception:  # the cluster is still deciding
            return False

    return check
