"""What the stages share: the run's options, its private PostgreSQL and Redis,
and every process it starts, each stopped at the end in reverse order."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import redis

from loadtest.verdict import backlog
from voteflow.children import Child, spawn
from voteflow.keys import Keys
from voteflow.migrate import migrate
from voteflow.servers import HOST, PostgresServer, RedisClusterServers, RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
VOTEFLOW = [sys.executable, "-m", "voteflow"]
AOF_REWRITE_TIMEOUT = 60.0
DATABASE = "bench"
# Seconds any one statement of the bench's own may take (a CHECKPOINT, say).
COMMAND_TIMEOUT = 120.0
T = TypeVar("T")
S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Options:
    repeats: int
    duration: int  # seconds of each measured wrk run
    warmup: int  # seconds of the unmeasured run before a stage's first repeat
    connections: int
    threads: int  # wrk's
    wrk: str  # wrk's path
    steady_rate: float = 0.0  # stage 5's offered votes/s; 0: half of stage 2's
    steady_duration: int = 30  # seconds of each stage 5 run
    spike_votes: int = 50_000  # stage 6
    spike_connections: int = 1000  # stage 6
    watchers: int = 10_000  # stage 8
    fanout_rate: float = 200.0  # stage 8's votes/s while the watchers watch
    drain_votes: int = 300_000  # stage 4's backlog
    drain_workers: int = 1  # stage 4's workers draining it
    drain_repeats: int = 1  # stage 4's repeats, at most --repeats: it is long


@dataclass(frozen=True, slots=True)
class Servers:
    postgres: PostgresServer
    redis: RedisServer
    database_url: str  # the migrated database "bench" on `postgres`


def _database_url(server_url: str, database: str) -> str:
    return server_url.rsplit("/", 1)[0] + "/" + database


def run_sql(database_url: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `work` on one fresh connection to `database_url`, from synchronous code."""

    async def go() -> T:
        conn = await asyncpg.connect(database_url, timeout=10, command_timeout=COMMAND_TIMEOUT)
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def sql(database_url: str, query: str, *args: Any, answer: str = "execute") -> Any:
    """One statement on a fresh connection, from synchronous code: its status
    (answer "execute"), its rows ("fetch"), first row ("fetchrow") or value ("fetchval")."""
    return run_sql(database_url, lambda conn: getattr(conn, answer)(query, *args))


def progress(message: str) -> None:
    """A line on the bench's progress, on stderr (stdout holds the results)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def rewrite_aof(client: redis.Redis) -> None:
    """Let Redis compact its append-only file and wait for it, so that each
    repeat starts alike (with appendfsync always, a long file slows appends)."""
    _wait_for_rewrite(client)
    try:
        client.bgrewriteaof()  # type: ignore[no-untyped-call]
    except redis.ResponseError as exc:
        # Redis began one of its own (auto-aof-rewrite) in between: as good.
        if "already in progress" not in str(exc):
            raise
    _wait_for_rewrite(client)


def _wait_for_rewrite(client: redis.Redis) -> None:
    deadline = time.monotonic() + AOF_REWRITE_TIMEOUT
    while True:
        info: dict[str, Any] = client.info("persistence")  # type: ignore[assignment]
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("Redis did not finish rewriting its append-only file")
        time.sleep(0.05)


def wait_drained(
    client: redis.Redis | redis.RedisCluster,
    keys: Keys,
    workers: Sequence[Child],
    stall_timeout: float,
    every: float = 0.05,
) -> None:
    """Wait until the streams' backlog is 0 (every appended vote committed);
    fail if a worker exits or nothing is committed for `stall_timeout` s."""
    left, progressed = backlog(client, keys), time.monotonic()
    while left:
        time.sleep(every)
        for worker in workers:
            worker.check_alive()
        now_left = backlog(client, keys)
        if now_left < left:
            progressed = time.monotonic()
        elif time.monotonic() - progressed > stall_timeout:
            raise RuntimeError(
                f"{now_left} votes still in the streams, none committed for "
                f"{stall_timeout:.0f}s\n{workers[0].log_tail()}"
            )
        left = now_left


class Bench:
    """One run's shared state. Everything it starts is registered on `stack`."""

    def __init__(self, options: Options, stack: ExitStack, work_dir: Path) -> None:
        self.options = options
        self.stack = stack
        self.work_dir = work_dir
        self._servers: dict[str, Servers] = {}
        self._databases: dict[str, tuple[PostgresServer, str]] = {}
        self._clusters: dict[str, RedisClusterServers] = {}
        # What stages share beyond the servers (the pipeline of stages 5-8), by class.
        self._shared: dict[type, object] = {}
        # Each stage's rates measured so far in this run, by stage number.
        self.rates: dict[int, list[float]] = {}

    def share(self, kind: type[S]) -> S:
        """What several stages share (the pipeline, a cluster): made by the first that asks."""
        found = self._shared.get(kind)
        if found is None:
            found = self._shared[kind] = kind(self)  # type: ignore[call-arg]
        assert isinstance(found, kind)
        return found

    def servers(self, name: str = "shared") -> Servers:
        """Private servers, started and migrated on first use, by name.

        Stages 1-4 share one pair; stages 5-7 have their own, so that the
        memory the drain's million votes took does not count as theirs.
        Durable as a deployment runs them: PostgreSQL with fsync and
        synchronous commit, Redis with ``appendfsync always`` as `voteflow up`.
        """
        found = self._servers.get(name)
        if found is None:
            postgres, database_url = self.database(name)
            redis = self.stack.enter_context(
                RedisServer(self.work_dir / f"{name}-redis", appendonly=True, appendfsync="always")
            )
            found = self._servers[name] = Servers(postgres, redis, database_url)
        return found

    def database(self, name: str) -> tuple[PostgresServer, str]:
        """A private PostgreSQL and the URL of its migrated database "bench",
        started on first use, by name (servers(name) uses the same one)."""
        found = self._databases.get(name)
        if found is None:
            # Commit timestamps let the end-to-end stages read when each
            # vote's transaction committed (pg_xact_commit_timestamp).
            postgres = self.stack.enter_context(
                PostgresServer(
                    self.work_dir / f"{name}-postgres",
                    settings={"track_commit_timestamp": "on"},
                )
            )

            sql(postgres.url, f'CREATE DATABASE "{DATABASE}"')
            database_url = _database_url(postgres.url, DATABASE)
            asyncio.run(migrate(database_url))
            found = self._databases[name] = (postgres, database_url)
        return found

    def redis_cluster(self, name: str, masters: int, replicas: int) -> RedisClusterServers:
        """A private Redis Cluster, started on first use, by name: every node
        with ``appendfsync always``, as `voteflow up` runs its Redis."""
        found = self._clusters.get(name)
        if found is None:
            found = self._clusters[name] = self.stack.enter_context(
                RedisClusterServers(
                    self.work_dir / f"{name}-redis-cluster", masters=masters, replicas=replicas
                )
            )
        return found

    def child_env(self, **extra: str) -> dict[str, str]:
        """The bench's environment without any VOTEFLOW_* setting, plus `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEFLOW_")}
        env.update(extra)
        return env

    def voteflow(
        self, name: str, env: dict[str, str], n: int = 1, **edge_env: str
    ) -> tuple[list[str], list[Child], list[Child]]:
        """`n` edges (each on a port of its own, trusting the bench as its
        proxy, with `edge_env` too) and then `n` workers, with `env`; returns
        (the edges' URLs, the edges, the workers) once every edge answers."""
        urls, edges = [], []
        for i in range(n):
            port = free_port()
            edge = self.child_env(
                **env, **edge_env, VOTEFLOW_HOST=HOST, VOTEFLOW_PORT=str(port),
                VOTEFLOW_TRUSTED_PROXIES=HOST,
            )  # fmt: skip
            edges.append(self.spawn(f"{name}-edge-{i}", [*VOTEFLOW, "edge"], edge))
            urls.append(f"http://{HOST}:{port}")
        for child, url in zip(edges, urls, strict=True):
            child.wait_http(f"{url}/health")
        worker = self.child_env(**env, VOTEFLOW_WORKER_METRICS_PORT="0")
        workers = [
            self.spawn(f"{name}-worker-{i}", [*VOTEFLOW, "worker"], worker) for i in range(n)
        ]
        return urls, edges, workers

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        """Start a process in the repository; it is stopped when the run ends."""
        log_path = self.work_dir / f"{name}.log"
        return self.stack.enter_context(
            spawn(name, argv, env=env, cwd=REPO, log=log_path, session=True)
        )
