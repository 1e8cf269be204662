"""Nothing acknowledged is lost: faults injected into real processes.

Each test runs edges and workers as OS processes, breaks one at a precise
moment, and then checks that every vote answered 202 is in PostgreSQL exactly
once and that the results equal both the rules' prediction and a recount.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.cluster import (
    REQUEST_TIMEOUT,
    Cluster,
    Flood,
    Process,
    check_counted_once,
    create_poll,
    get_results,
    option_ids_of,
    stored_vote_ids,
    until,
)
from tests.support import backlog, drain, recount, votes_by_option
from voteflow.keys import GROUP
from voteflow.migrate import migrate
from voteflow.servers import PostgresServer, RedisServer
from voteflow.settings import Settings

VOTES = 300
MAX_VOTES_PER_CLIENT = 5000


async def send_votes(
    session: aiohttp.ClientSession, edge: Process, poll: dict[str, Any], n: int
) -> dict[str, dict[str, Any]]:
    """n ballots of distinct voters at once; returns the accepted ones by vote_id."""
    options = option_ids_of(poll)
    bodies = [
        {
            "poll_id": poll["id"],
            "option_ids": [options[i % len(options)]],
            "voter_fingerprint": f"voter-{i}",
            "vote_id": str(uuid.uuid4()),
        }
        for i in range(n)
    ]

    async def send(body: dict[str, Any]) -> int:
        async with session.post(f"{edge.url}/api/vote", json=body) as response:
            return response.status

    statuses = await asyncio.gather(*(send(body) for body in bodies))
    assert set(statuses) == {202}
    return {body["vote_id"]: body for body in bodies}


async def pending_of(cluster: Cluster, worker: Process) -> int:
    """Entries delivered to the worker and not acknowledged, over all shards."""
    return sum(c["pending"] for c in await cluster.consumers_of(worker) if c is not None)


async def waiting_on_locks(db: asyncpg.Connection) -> list[int]:
    """Backends of other sessions blocked on a lock: the worker's batches."""
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return [row["pid"] for row in rows]


async def start_worker_held_short_of_commit(
    cluster: Cluster, poll: dict[str, Any], db: asyncpg.Connection
) -> Process:
    """Start a worker while ``db`` (in a transaction) holds the poll's counters
    row: the worker takes every queued vote and its batches stop just short of
    their commit, holding everything else they wrote."""
    await db.execute("SELECT FROM poll_counters WHERE poll_id = $1 FOR UPDATE", poll["id"])
    _, (worker,) = await cluster.start(workers=1)
    await until(
        lambda: _equals(pending_of(cluster, worker), VOTES),
        timeout=20,
        what="the worker holds every vote",
    )
    await until(lambda: _any(waiting_on_locks(db)), 20, "the worker's batches wait")
    return worker


async def test_worker_killed_before_commit_leaves_its_batch_to_another_worker(
    cluster: Cluster, settings: Settings, redis_client: aioredis.Redis, db: asyncpg.Connection
) -> None:
    (edge,), _ = await cluster.start(edges=1)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B", "C"], allow_multiple_votes=True)
        accepted = await send_votes(session, edge, poll, VOTES)
        async with db.transaction():
            doomed = await start_worker_held_short_of_commit(cluster, poll, db)
            in_flight = await pending_of(cluster, doomed)
            doomed.popen.kill()
            assert await doomed.wait(10) is not None
            # PostgreSQL rolls back what a dead client left running.
            for pid in await waiting_on_locks(db):
                await db.execute("SELECT pg_terminate_backend($1)", pid)
        assert await db.fetchval("SELECT count(*) FROM votes") == 0
        print(f"votes in flight when the worker was killed: {in_flight}")
        await cluster.start(workers=1)
        await drain(redis_client, settings, timeout=60)
        await check_counted_once(session, edge, settings, poll, accepted)
    assert in_flight == VOTES


async def test_worker_killed_between_commit_and_ack_is_counted_once(
    cluster: Cluster, settings: Settings, redis_client: aioredis.Redis, db: asyncpg.Connection
) -> None:
    (edge,), _ = await cluster.start(edges=1)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B", "C"], allow_multiple_votes=True)
        accepted = await send_votes(session, edge, poll, VOTES)
        async with db.transaction():
            doomed = await start_worker_held_short_of_commit(cluster, poll, db)
            # Redis stops executing writes (the acknowledgements among them)...
            await redis_client.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
        # ...and the batches commit as the counters row is released.
        try:
            await until(
                lambda: _equals(db.fetchval("SELECT count(*) FROM votes"), VOTES),
                timeout=20,
                what="the worker committed every vote",
            )
            in_flight = VOTES
            doomed.popen.kill()
            assert await doomed.wait(10) is not None
        finally:
            await redis_client.execute_command("CLIENT", "UNPAUSE")
        # The acknowledgements died with the worker: the votes are still pending.
        assert await pending_of(cluster, doomed) == VOTES
        print(f"votes committed but not acknowledged when the worker was killed: {in_flight}")
        await cluster.start(workers=1)
        await drain(redis_client, settings, timeout=60)
        await check_counted_once(session, edge, settings, poll, accepted)
        counters = await db.fetchrow(
            "SELECT total_ballots FROM poll_counters WHERE poll_id = $1", poll["id"]
        )
        assert counters["total_ballots"] == VOTES
    consumers = await redis_client.xinfo_consumers(cluster.keys.stream(0), GROUP)
    assert all(c["pending"] == 0 for c in consumers)


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, which it may stop and restart."""
    with PostgresServer(tmp_path / "postgres", durable=True) as server:
        yield server


async def test_postgres_outage_is_absorbed_by_the_streams_and_nothing_is_lost(
    own_postgres: PostgresServer,
    settings: Settings,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    await migrate(own_postgres.url)
    settings = replace(settings, database_url=own_postgres.url)
    cluster = Cluster(settings, tmp_path, redis_client)
    try:
        (edge,), (worker,) = await cluster.start(edges=1, workers=1)
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            poll = await create_poll(session, edge, ["A", "B"], allow_multiple_votes=True)
            flood = Flood(session, edge, poll)
            sending = flood.run(clients=16)
            try:
                await until(lambda: len(flood.accepted) >= 300, 30, "300 votes accepted")
                own_postgres.kill()
                at_outage = len(flood.accepted)
                # Longer than the edge's poll cache lives: it keeps the last copy.
                await asyncio.sleep(settings.poll_cache_ttl + 3)
                async with session.get(f"{edge.url}/ready") as response:
                    assert response.status == 503
                    assert (await response.json())["failing"] == ["postgres"]
                accepted_during_outage = len(flood.accepted) - at_outage
                in_flight = await backlog(redis_client, settings)
                own_postgres.start()
            finally:
                await flood.finish(sending)
            assert worker.popen.poll() is None, worker.log_tail()  # retried, did not crash
            await drain(redis_client, settings, timeout=60)
            await check_counted_once(session, edge, settings, flood.poll, flood.accepted)
        assert set(flood.statuses) == {202}, flood.statuses
        assert accepted_during_outage > 0
        print(
            f"PostgreSQL outage: {accepted_during_outage} votes accepted while it was down, "
            f"{in_flight} queued when it returned, 0 lost"
        )
    finally:
        problems = await cluster.close()
    assert not problems, "\n".join(problems)


async def _any(pids: Any) -> bool:
    return bool(await pids)


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, persisting every append before it answers."""
    with RedisServer(tmp_path / "redis", appendonly=True, appendfsync="always") as server:
        yield server


@dataclass
class Answer:
    vote_id: str
    status: int  # 0: no answer (connection error)
    seconds: float
    retry_after: str | None


async def test_redis_outage_answers_503_fast_and_recovers_without_losing_a_202(
    own_redis: RedisServer, settings: Settings, tmp_path: Path
) -> None:
    settings = replace(settings, redis_url=own_redis.url)
    redis = aioredis.Redis.from_url(own_redis.url)
    cluster = Cluster(settings, tmp_path, redis)
    answers: list[Answer] = []
    stop = asyncio.Event()
    try:
        (edge,), (worker,) = await cluster.start(edges=1, workers=1)
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            poll = await create_poll(session, edge, ["A", "B"], allow_multiple_votes=True)
            options = option_ids_of(poll)

            async def client(n: int) -> None:
                for i in range(MAX_VOTES_PER_CLIENT):
                    if stop.is_set():
                        return
                    body = {
                        "poll_id": poll["id"],
                        "option_ids": [options[i % 2]],
                        "voter_fingerprint": f"c{n}",
                        "vote_id": str(uuid.uuid4()),
                    }
                    started = time.monotonic()
                    try:
                        async with session.post(f"{edge.url}/api/vote", json=body) as response:
                            await response.read()
                            status, retry = response.status, response.headers.get("Retry-After")
                    except aiohttp.ClientError:
                        status, retry = 0, None
                    answers.append(
                        Answer(body["vote_id"], status, time.monotonic() - started, retry)
                    )
                    if status != 202:
                        await asyncio.sleep(0.05)

            sending = asyncio.gather(*(client(n) for n in range(16)))
            try:
                await until(lambda: len(answers) >= 300, 30, "300 votes answered")
                own_redis.kill()
                down_from = len(answers)
                await asyncio.sleep(5)
                down = answers[down_from:]
                own_redis.start()
                up_from = len(answers)
                await until(
                    lambda: any(a.status == 202 for a in answers[up_from:]),
                    30,
                    "the edge accepts votes again by itself",
                )
                await asyncio.sleep(1)
            finally:
                stop.set()
                async with asyncio.timeout(30):
                    await sending
            # The worker rode out the outage: the same process drains the backlog.
            assert worker.popen.poll() is None, worker.log_tail()
            await drain(redis, settings, timeout=60)
            accepted = {a.vote_id for a in answers if a.status == 202}
            stored = set(await stored_vote_ids(settings.database_url, poll["id"]))
            unconfirmed = {a.vote_id for a in answers if a.status != 202}
            result = await get_results(session, edge, poll["id"])
        # Every 202 is counted; a vote that was not confirmed may or may not be.
        assert accepted <= stored
        assert stored <= accepted | unconfirmed
        assert votes_by_option(result) == await recount(settings.database_url, poll["id"])
        assert result["total_ballots"] == len(stored)
        # While Redis was down: 503 with Retry-After, answered promptly.
        during = [a for a in down if a.status != 202]
        assert during, "no request was answered while Redis was down"
        assert {a.status for a in during} == {503}
        assert all(a.retry_after for a in during)
        assert max(a.seconds for a in down) < 3.0
        print(
            f"Redis outage: {len(during)} votes answered 503 while it was down "
            f"(slowest answer {max(a.seconds for a in down):.2f}s), "
            f"{len(accepted)} accepted in all, 0 lost"
        )
    finally:
        problems = await cluster.close()
        await redis.aclose()
    assert not problems, "\n".join(problems)
