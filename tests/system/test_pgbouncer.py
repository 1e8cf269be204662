"""voteflow behind PgBouncer in transaction pooling mode.

Each test starts a private PgBouncer (tests/pgbouncer.py) in front of the
test's PostgreSQL, with `default_pool_size` POOL_SIZE, and points voteflow at
it with asyncpg's statement cache off (VOTEFLOW_DATABASE_STATEMENT_CACHE_SIZE=0):
this PgBouncer keeps no prepared statements across transactions. What is
checked is read from PostgreSQL directly, never through PgBouncer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.cluster import REQUEST_TIMEOUT, Cluster, check_counted_once, create_poll, tally_of
from tests.pgbouncer import PgBouncer, pgbouncer_executable
from tests.support import (
    InProcessWorker,
    applied_versions,
    drain,
    edge_client,
    migration_names,
    recount,
    results,
    votes_by_option,
)
from tests.support import create_poll as create_poll_in_process
from voteflow.migrate import migrate, migration_files
from voteflow.settings import Settings

# Server connections PgBouncer may open per database: fewer than the client
# connections voteflow opens in the pooling test.
POOL_SIZE = 4
VOTES = 300
VOTERS = 100
# Requests in flight at once from the test's voters.
CONCURRENCY = 32
# Seconds between two looks at PgBouncer and PostgreSQL while votes flow,
# and the most looks taken.
SAMPLE_EVERY = 0.1
MAX_SAMPLES = 1200
EDGES = 3
WORKERS = 2

PostVote = Callable[[dict[str, Any]], Awaitable[int]]


@pytest.fixture
def pgbouncer(pg_server_url: str, tmp_path: Path) -> Iterator[PgBouncer]:
    if pgbouncer_executable() is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    # A short directory name: the unix socket's path must fit in sun_path.
    with PgBouncer(tmp_path / "pgb", pg_server_url, pool_size=POOL_SIZE) as bouncer:
        yield bouncer


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def behind(bouncer: PgBouncer, settings: Settings) -> Settings:
    """`settings` with the database reached through `bouncer`, statement cache off."""
    via = bouncer.url(database_of(settings.database_url))
    return dataclasses.replace(settings, database_url=via, database_statement_cache_size=0)


async def send_votes(post: PostVote, poll: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """VOTES one-option ballots from VOTERS voters, CONCURRENCY at a time; every
    one must be accepted. Returns vote_id -> body."""
    options = [option["id"] for option in poll["options"]]
    rng = random.Random(7)
    bodies = [
        {
            "poll_id": poll["id"],
            "option_ids": [rng.choice(options)],
            "voter_fingerprint": f"voter-{n % VOTERS}",
            "vote_id": str(uuid.uuid4()),
        }
        for n in range(VOTES)
    ]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def send(body: dict[str, Any]) -> int:
        async with gate:
            return await post(body)

    statuses = await asyncio.gather(*(send(body) for body in bodies))
    assert statuses == [202] * VOTES
    return {body["vote_id"]: body for body in bodies}


async def pool_row(bouncer: PgBouncer, database: str) -> dict[str, str]:
    """PgBouncer's SHOW POOLS line of `database` (one user: the test's)."""
    rows = [row for row in await bouncer.show("POOLS") if row["database"] == database]
    assert len(rows) == 1, rows
    return rows[0]


async def test_votes_through_pgbouncer_in_transaction_mode_are_counted_exactly_once(
    pgbouncer: PgBouncer, settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # The edge and the worker as users run them: OS processes configured by
    # their environment alone.
    via = behind(pgbouncer, settings)
    env = {
        "VOTEFLOW_DATABASE_URL": via.database_url,
        "VOTEFLOW_DATABASE_STATEMENT_CACHE_SIZE": str(via.database_statement_cache_size),
    }
    running = Cluster(settings, tmp_path, redis_client, env=env)
    try:
        (edge,), _ = await running.start(edges=1, workers=1)
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            poll = await create_poll(session, edge, ["A", "B", "C"], allow_multiple_votes=True)

            async def post(body: dict[str, Any]) -> int:
                async with session.post(f"{edge.url}/api/vote", json=body) as response:
                    await response.read()
                    return response.status

            accepted = await send_votes(post, poll)
            await drain(redis_client, settings, timeout=60)
            # The votes read from PostgreSQL itself (settings.database_url),
            # the results from the edge.
            await check_counted_once(session, edge, settings, poll, accepted)
        # Both processes' pools are PgBouncer's clients: nothing bypassed it.
        row = await pool_row(pgbouncer, database_of(settings.database_url))
        assert row["pool_mode"] == "transaction"
        assert int(row["cl_active"]) + int(row["cl_waiting"]) >= 2
    finally:
        problems = await running.close()
    assert not problems, "\n".join(problems)


@dataclasses.dataclass
class Peaks:
    """The most connections seen at once while votes flowed."""

    clients: int = 0  # voteflow's connections to PgBouncer
    servers: int = 0  # PgBouncer's connections to PostgreSQL, as it reports them
    backends: int = 0  # client backends on the database, as PostgreSQL reports them
    samples: int = 0


async def watch_connections(
    bouncer: PgBouncer, database_url: str, peaks: Peaks, stop: asyncio.Event
) -> None:
    database = database_of(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        while not stop.is_set() and peaks.samples < MAX_SAMPLES:
            rows = [row for row in await bouncer.show("POOLS") if row["database"] == database]
            for row in rows:
                assert row["pool_mode"] == "transaction"
                peaks.clients = max(peaks.clients, int(row["cl_active"]) + int(row["cl_waiting"]))
                servers = sum(int(value) for key, value in row.items() if key.startswith("sv_"))
                peaks.servers = max(peaks.servers, servers)
            backends = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            peaks.backends = max(peaks.backends, backends)
            peaks.samples += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def watching(bouncer: PgBouncer, database_url: str) -> AsyncIterator[Peaks]:
    peaks, stop = Peaks(), asyncio.Event()
    task = asyncio.create_task(watch_connections(bouncer, database_url, peaks, stop))
    try:
        yield peaks
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await task


async def test_pgbouncer_carries_more_voteflow_connections_than_it_opens_to_postgresql(
    pgbouncer: PgBouncer, settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Each edge's pool and each worker's holds at least one connection (their
    # min_size) from start to end: EDGES + WORKERS clients, more than POOL_SIZE.
    assert EDGES + WORKERS > POOL_SIZE
    via = behind(pgbouncer, settings)
    async with contextlib.AsyncExitStack() as stack:
        peaks = await stack.enter_async_context(watching(pgbouncer, settings.database_url))
        edges = [await stack.enter_async_context(edge_client(via)) for _ in range(EDGES)]
        for _ in range(WORKERS):
            await stack.enter_async_context(InProcessWorker(via))
        poll = await create_poll_in_process(edges[0], allow_multiple_votes=True)
        sent = 0

        async def post(body: dict[str, Any]) -> int:
            nonlocal sent
            sent += 1
            response = await edges[sent % EDGES].post("/api/vote", json=body)
            await response.read()
            return response.status

        accepted = await send_votes(post, poll)
        await drain(redis_client, settings, timeout=60)
        result = await results(edges[1], poll["id"])
    assert peaks.samples >= 1
    assert peaks.clients >= EDGES + WORKERS, peaks
    assert 1 <= peaks.servers <= POOL_SIZE, peaks
    assert 1 <= peaks.backends <= POOL_SIZE, peaks
    # And through those few server connections every vote was counted once.
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT vote_id FROM votes WHERE poll_id = $1", poll["id"])
    finally:
        await conn.close()
    stored = [str(row["vote_id"]) for row in rows]
    assert sorted(stored) == sorted(accepted)
    options = [option["id"] for option in poll["options"]]
    expected = tally_of((body["option_ids"] for body in accepted.values()), options)
    assert votes_by_option(result) == expected == await recount(settings.database_url, poll["id"])
    assert result["total_ballots"] == VOTES


async def advisory_locks(database_url: str) -> int:
    """Advisory locks held on the database, read from PostgreSQL itself."""
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    finally:
        await conn.close()
    return count


async def test_migrations_apply_through_pgbouncer_in_transaction_mode(
    pgbouncer: PgBouncer, empty_database_url: str
) -> None:
    via = pgbouncer.url(database_of(empty_database_url))
    names = migration_names()
    async with asyncio.timeout(60):
        runs = await asyncio.gather(*(migrate(via, vote_partitions=2) for _ in range(3)))
    # One run applied everything; the others waited for it and found nothing to do.
    assert sorted(runs, key=len) == [[], [], names]
    # No lock stays behind on PgBouncer's pooled server connections ...
    assert await advisory_locks(empty_database_url) == 0
    # ... so a later run finds nothing to do even when PgBouncer hands it a
    # server connection other than the last one (this one is held meanwhile).
    holder = await asyncpg.connect(via, statement_cache_size=0)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1")
            async with asyncio.timeout(30):
                assert await migrate(via, vote_partitions=2) == []
    finally:
        await holder.close()
    assert await applied_versions(empty_database_url) == [v for v, _ in migration_files()]


async def replay_on_another_server_connection(
    url: str, statement_cache_size: int
) -> tuple[int, int]:
    """Run one query twice on one client connection, the second time while
    another client holds, in a transaction, the server connection that ran the
    first. PgBouncer hands out the server connection released last, so the
    other client gets that one, and the second query another. Returns the two
    server processes' pids.
    """
    client = await asyncpg.connect(url, statement_cache_size=statement_cache_size)
    other = await asyncpg.connect(url, statement_cache_size=0)
    query = "SELECT pg_backend_pid() WHERE $1::uuid IS NOT NULL"
    try:
        first: int = await client.fetchval(query, uuid.uuid4())
        async with other.transaction():
            await other.execute("SELECT 1")
            second: int = await client.fetchval(query, uuid.uuid4())
    finally:
        await other.close()
        await client.close()
    return first, second


async def test_the_default_statement_cache_fails_behind_transaction_pooling(
    pgbouncer: PgBouncer, database_url: str
) -> None:
    via = pgbouncer.url(database_of(database_url))
    # asyncpg reuses the statement it prepared, by name, on a server connection
    # that never saw it.
    with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
        await replay_on_another_server_connection(via, Settings().database_statement_cache_size)
    # With the cache off, each query is prepared where it runs.
    first, second = await replay_on_another_server_connection(via, 0)
    assert first != second
