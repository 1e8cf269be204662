"""An outage of PostgreSQL never costs a vote: whatever way PostgreSQL refuses
everyone, and for as long as it does, every vote answered 202 is counted once
it is over, and none is dead-lettered, even when a worker holding votes is
killed in the middle and the reclaim job keeps claiming them.

Each test runs an edge and two workers as OS processes, with
VOTEFLOW_MAX_DELIVERIES=2 so that a single delivery counted for the outage
would show, sends votes at a steady pace, makes PostgreSQL refuse for
``VOTEFLOW_TEST_OUTAGE_SECONDS`` (5 by default; the fault table of docs/guarantees.md ran
them longer), SIGKILLs a worker that holds votes and starts another in its
place, and then checks the count. Each prints one row of that table.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.cluster import (
    REQUEST_TIMEOUT,
    Cluster,
    Flood,
    Process,
    check_counted_once,
    create_poll,
    until,
)
from tests.support import ADMIN, drain
from tests.support import create_poll as create_poll_in
from voteflow.migrate import migrate
from voteflow.servers import PostgresServer
from voteflow.settings import Settings

OUTAGE_SECONDS = float(os.environ.get("VOTEFLOW_TEST_OUTAGE_SECONDS", "5"))
# Each client's pause between votes: a steady stream, bounded however long
# the outage (Flood stops each client after its 5,000th vote).
PACE = 0.05
CLIENTS = 8

Step = Callable[[], Awaitable[None]]


async def _terminate_others(conn: asyncpg.Connection, keep: list[int]) -> None:
    """End every other session on the database, so that the workers' pools
    reconnect and take the database's new settings (as after a failover)."""
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> ALL($1)",
        keep,
    )


async def _pending(cluster: Cluster, worker: Process) -> int:
    """Votes delivered to the worker and not yet acknowledged, over all shards."""
    return sum(c["pending"] for c in await cluster.consumers_of(worker) if c is not None)


async def _dead_letters(redis: aioredis.Redis, cluster: Cluster) -> int:
    return sum([await redis.xlen(cluster.keys.dead_letters(s)) for s in range(cluster.keys.shards)])


async def ride_out(
    name: str,
    settings: Settings,
    redis: aioredis.Redis,
    tmp_path: Path,
    begin: Step,
    end: Step,
) -> None:
    cluster = Cluster(settings, tmp_path, redis, env={"VOTEFLOW_MAX_DELIVERIES": "2"})
    try:
        (edge,), (doomed, _) = await cluster.start(edges=1, workers=2)
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            poll = await create_poll(session, edge, ["A", "B", "C"], allow_multiple_votes=True)
            flood = Flood(session, edge, poll, pause=PACE)
            sending = flood.run(clients=CLIENTS)
            try:
                await until(lambda: len(flood.accepted) >= 200, 30, "200 votes accepted")
                await begin()
                began = time.monotonic()
                # Killed once it holds votes it could not write: they stay
                # pending under its name until the reclaim job claims them.
                await until(
                    lambda: _positive(_pending(cluster, doomed)),
                    OUTAGE_SECONDS + 30,
                    "the doomed worker holds votes",
                )
                held = await _pending(cluster, doomed)
                doomed.popen.kill()
                assert await doomed.wait(10) is not None
                await cluster.start(workers=1)
                await asyncio.sleep(max(OUTAGE_SECONDS - (time.monotonic() - began), 0))
                during = len(flood.accepted)
                await end()
                lasted = time.monotonic() - began
            finally:
                await flood.finish(sending)
            await drain(redis, settings, timeout=120)
            await check_counted_once(session, edge, settings, poll, flood.accepted)
        dead = await _dead_letters(redis, cluster)
        assert dead == 0
        assert flood.statuses[202] == len(flood.accepted)
        print(
            f"\n| {name} for {lasted:.0f} s, a worker holding {held} votes killed | "
            f"{len(flood.accepted):,} answered 202 ({during:,} by the outage's end) | "
            f"{len(flood.accepted):,} counted | 0 lost | {dead} dead-lettered |"
        )
    finally:
        problems = await cluster.close()
    assert not problems, "\n".join(problems)


async def _positive(value: Awaitable[int]) -> bool:
    return await value > 0


async def test_read_only_postgres_dead_letters_nothing(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """SQLSTATE 25006: a failover landing on a standby, or an operator's
    default_transaction_read_only."""
    database = await db.fetchval("SELECT current_database()")

    async def begin() -> None:
        await db.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        await _terminate_others(db, [])

    async def end() -> None:
        await db.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await _terminate_others(db, [])

    await ride_out("PostgreSQL read-only", settings, redis_client, tmp_path, begin, end)


async def test_statement_timeout_on_every_batch_dead_letters_nothing(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """SQLSTATE 57014: every batch waits on a lock past statement_timeout."""
    database = await db.fetchval("SELECT current_database()")
    locker = await asyncpg.connect(settings.database_url)
    locking: asyncpg.transaction.Transaction | None = None

    async def begin() -> None:
        nonlocal locking
        await db.execute(f'ALTER DATABASE "{database}" SET statement_timeout = 200')
        await _terminate_others(db, [await locker.fetchval("SELECT pg_backend_pid()")])
        locking = locker.transaction()
        await locking.start()
        # Every batch updates the poll's counters row: each waits, then times out.
        await locker.execute("LOCK TABLE poll_counters IN EXCLUSIVE MODE")

    async def end() -> None:
        assert locking is not None
        await locking.rollback()
        await db.execute(f'ALTER DATABASE "{database}" RESET statement_timeout')
        await _terminate_others(db, [await locker.fetchval("SELECT pg_backend_pid()")])

    try:
        await ride_out(
            "A statement timeout on every batch", settings, redis_client, tmp_path, begin, end
        )
    finally:
        await locker.close()


async def test_a_missing_function_dead_letters_nothing(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """SQLSTATE 42883, a class no list of outages names: a botched migration
    leaves cast_vote_atomic missing. It refuses every vote alike, so it is an
    outage, not the votes' fault."""

    async def begin() -> None:
        await db.execute("ALTER FUNCTION cast_vote_atomic(vote_in[]) RENAME TO cast_vote_away")

    async def end() -> None:
        await db.execute("ALTER FUNCTION cast_vote_away(vote_in[]) RENAME TO cast_vote_atomic")

    await ride_out("cast_vote_atomic missing", settings, redis_client, tmp_path, begin, end)


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, which it may kill and restart."""
    with PostgresServer(tmp_path / "postgres", durable=True) as server:
        yield server


async def test_postgres_down_dead_letters_nothing(
    own_postgres: PostgresServer, settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    await migrate(own_postgres.url)
    settings = replace(settings, database_url=own_postgres.url)

    async def begin() -> None:
        own_postgres.kill()

    async def end() -> None:
        own_postgres.start()

    await ride_out("PostgreSQL down", settings, redis_client, tmp_path, begin, end)


async def test_admin_calls_on_a_read_only_postgres_are_503_not_500(
    edge: TestClient[Any, Any], db: asyncpg.Connection
) -> None:
    """The edge classifies by SQLSTATE class too: a read-only standby is
    'away for now' (503, Retry-After), not a bug of ours (500)."""
    poll = await create_poll_in(edge)
    database = await db.fetchval("SELECT current_database()")
    await db.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    await _terminate_others(db, [])
    body = {"question": "Q?", "options": ["a", "b"]}
    for path, sent in (("/api/polls", body), (f"/api/polls/{poll['id']}/close", None)):
        response = await edge.post(path, json=sent, headers=ADMIN)
        assert response.status == 503, await response.text()
        assert response.headers["Retry-After"] == "1"
    await db.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
    await _terminate_others(db, [])
    # As a client does: retried after a 503 (a pooled connection the server
    # ended answers once more so), created once the primary takes writes.
    statuses = []
    for _ in range(5):
        statuses.append((await edge.post("/api/polls", json=body, headers=ADMIN)).status)
        if statuses[-1] != 503:
            break
    assert statuses[-1] == 201 and set(statuses) <= {201, 503}, statuses
