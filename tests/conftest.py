"""Real servers for the test suite, and a private corner of them for each test.

Once per run: a private PostgreSQL and a private Redis-compatible server
(voteflow.servers), unless ``VOTEFLOW_TEST_POSTGRES_URL`` /
``VOTEFLOW_TEST_REDIS_URL`` name servers to use instead. Per test: a database
of its own, cloned from a migrated template, and a Redis key prefix of its own.
Every database and key created is removed at the end, so a run never touches
anything else on a server it shares.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import FrameType

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.cluster import Cluster
from tests.databases import Databases, with_database
from tests.support import ADMIN_TOKEN, InProcessWorker, edge_client
from voteflow.migrate import migrate
from voteflow.servers import PostgresServer, RedisClusterServers, RedisServer
from voteflow.settings import Settings

RUN_ID = secrets.token_hex(4)
_counter = itertools.count()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def pytest_configure(config: pytest.Config) -> None:
    # Started from a script (`make test &`, nohup), pytest begins with SIGINT
    # ignored, and Python leaves it so: Ctrl-C would not stop the run. SIGTERM
    # interrupts it the same way, so that the run's private servers are
    # stopped and its databases dropped on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def pg_server_url(servers_dir: Path) -> Iterator[str]:
    url = os.environ.get("VOTEFLOW_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    with PostgresServer(servers_dir / "postgres", durable=False) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_server_url(servers_dir: Path) -> Iterator[str]:
    url = os.environ.get("VOTEFLOW_TEST_REDIS_URL")
    if url:
        yield url
        return
    with RedisServer(servers_dir / "redis", appendonly=False) as server:
        yield server.url


async def _admin(server_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_database(pg_server_url: str) -> Iterator[str]:
    """A migrated database that every test's database is cloned from."""
    name = f"vftest_{RUN_ID}_template"

    async def setup() -> None:
        await _admin(pg_server_url, f'CREATE DATABASE "{name}"')
        await migrate(with_database(pg_server_url, name))

    asyncio.run(setup())
    yield name

    # Tests' databases are dropped at the end of the run; this one as well.
    async def teardown() -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1", f"vftest_{RUN_ID}_%"
            )
            for row in rows:
                await conn.execute(f'DROP DATABASE IF EXISTS "{row[0]}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(teardown())


@pytest.fixture(scope="session")
def databases(pg_server_url: str, template_database: str) -> Databases:
    pool = Databases(pg_server_url, template_database, f"vftest_{RUN_ID}")
    asyncio.run(pool.prepare())
    return pool


@pytest.fixture
async def database_url(pg_server_url: str, databases: Databases) -> AsyncIterator[str]:
    """A migrated database of this test's own, with no polls or votes in it."""
    name = await databases.take()
    yield with_database(pg_server_url, name)
    await databases.give_back(name)


@pytest.fixture
async def other_database_url(pg_server_url: str, databases: Databases) -> AsyncIterator[str]:
    """A second migrated database, for a test that needs two (a read replica)."""
    name = await databases.take()
    yield with_database(pg_server_url, name)
    await databases.give_back(name)


@pytest.fixture
async def empty_database_url(pg_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A brand-new database with nothing in it."""
    name = f"vftest_{RUN_ID}_empty_{next(_counter)}"
    await _admin(pg_server_url, f'CREATE DATABASE "{name}" TEMPLATE template0')
    yield with_database(pg_server_url, name)
    await _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def key_prefix(redis_server_url: str) -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"vftest:{RUN_ID}:{next(_counter)}"
    yield prefix
    client = redis.Redis.from_url(redis_server_url)
    try:
        # arq's keys carry the prefix inside their hash tag (Keys.arq_tag).
        for pattern in (f"{prefix}:*", f"{{{prefix}:arq}}*"):
            for key in client.scan_iter(match=pattern, count=1000):
                client.delete(key)
    finally:
        client.close()


@pytest.fixture
def settings(database_url: str, redis_server_url: str, key_prefix: str) -> Settings:
    """Settings for an edge and workers confined to this test's database and keys."""
    return Settings(
        database_url=database_url,
        redis_url=redis_server_url,
        admin_token=ADMIN_TOKEN,
        key_prefix=key_prefix,
        stream_shards=4,
        batch_size=200,
        consumers=4,
        rate_limit_per_ip=0,
        rate_limit_per_voter=0,
        worker_metrics_port=0,
        claim_idle_ms=1000,
    )


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database, closed after the test."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def redis_client(redis_server_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server_url)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Cluster]:
    """Edge and worker processes on this test's database and key prefix; each
    is stopped at the end and must have exited with status 0 (or been killed
    by the test)."""
    running = Cluster(settings, tmp_path, redis_client)
    try:
        yield running
    finally:
        problems = await running.close()
    assert not problems, "\n".join(problems)


@pytest.fixture
async def edge(settings: Settings) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """An HTTP edge on a loopback port, with this test's settings."""
    async with edge_client(settings) as client:
        yield client


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[InProcessWorker]:
    """A worker's consumers, running in the test's event loop."""
    async with InProcessWorker(settings) as running:
        yield running


@pytest.fixture(scope="module")
def three_masters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    with RedisClusterServers(
        tmp_path_factory.mktemp("redis-cluster"), masters=3, appendonly=False
    ) as servers:
        yield servers


@pytest.fixture
def on_cluster(settings: Settings, three_masters: RedisClusterServers) -> Settings:
    return dataclasses.replace(
        settings, redis_url=three_masters.url, redis_cluster=True, stream_shards=8
    )
