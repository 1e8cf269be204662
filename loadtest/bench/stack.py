"""What the stages share: the run's options, its private servers (a Store:
one Redis or a Redis Cluster, and a PostgreSQL), and every process it starts,
each stopped at the end in reverse order."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import redis

from loadtest.verdict import backlog
from voteflow.children import Child, spawn
from voteflow.keys import Keys
from voteflow.migrate import migrate
from voteflow.servers import HOST, PostgresServer, RedisClusterServers, RedisServer, free_port

if TYPE_CHECKING:
    from .stage import Sample


REPO = Path(__file__).resolve().parents[2]
VOTEFLOW = [sys.executable, "-m", "voteflow"]
SHARDS = 8  # VOTEFLOW_STREAM_SHARDS' default: 3, 3 and 2 on a cluster's three masters
AOF_REWRITE_TIMEOUT = 60.0
# Seconds any one statement of the bench's own may take (a CHECKPOINT, say).
COMMAND_TIMEOUT = 120.0
S = TypeVar("S")


def option(what: str, default: float | None = None, quick: float | None = None) -> Any:
    """An option of the bench's command line: its help, and its default in a
    full run and in a --quick one (the full run's when `quick` is None)."""
    metadata = {"help": what, "full": default, "quick": default if quick is None else quick}
    return field(default=0, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Options:
    """A run's options, each a flag of `python -m loadtest.bench` (cli.py).
    A default of 0 is worked out from the others when the run starts."""

    repeats: int = option("rounds", 3, 1)
    duration: int = option("seconds per measured run", 8, 5)
    warmup: int = option(
        "seconds of the warm-up run of each stage (default: a third of --duration, 1-3)"
    )
    connections: int = option("wrk's open connections", 64)
    threads: int = option("wrk's threads (each drives its share of the connections)", 1)
    drain_votes: int = option("stage 4: votes queued before the workers start", 300_000, 100_000)
    drain_workers: int = option("stage 4: worker processes draining them", 1)
    drain_repeats: int = option("stage 4: repeats, at most --repeats; the stage is long", 1)
    steady_rate: int = option(
        "stage 5: votes/s offered (default: half of stage 2's rate in this run)"
    )
    steady_duration: int = option("stage 5: seconds of each run", 20, 10)
    spike_votes: int = option("stage 6: votes in the spike", 50_000, 20_000)
    spike_connections: int = option("stage 6: wrk's connections for the spike", 1000)
    watchers: int = option("stage 8: SSE watchers of one poll", 10_000, 5_000)
    fanout_rate: int = option("stage 8: votes/s while they watch", 200)
    wrk: str = ""  # wrk's path: only the stages measured by wrk use it


def sql(database_url: str, query: str, *args: Any, answer: str = "execute") -> Any:
    """One statement on a fresh connection, from synchronous code: its status
    (answer "execute"), its rows ("fetch"), first row ("fetchrow") or value ("fetchval")."""

    async def go() -> Any:
        conn = await asyncpg.connect(database_url, timeout=10, command_timeout=COMMAND_TIMEOUT)
        try:
            return await getattr(conn, answer)(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def database_url(server_url: str, database: str) -> str:
    return server_url.rsplit("/", 1)[0] + "/" + database


def progress(message: str) -> None:
    """A line on the bench's progress, on stderr (stdout holds the results)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def rewrite_aof(client: redis.Redis) -> None:
    """Let Redis compact its append-only file, and wait for it."""

    def wait() -> None:
        deadline = time.monotonic() + AOF_REWRITE_TIMEOUT
        while True:
            info: dict[str, Any] = client.info("persistence")  # type: ignore[assignment]
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("Redis did not finish rewriting its append-only file")
            time.sleep(0.05)

    wait()
    try:
        client.bgrewriteaof()  # type: ignore[no-untyped-call]
    except redis.ResponseError as exc:
        # Redis began one of its own (auto-aof-rewrite) in between: as good.
        if "already in progress" not in str(exc):
            raise
    wait()


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


@dataclass(frozen=True, slots=True)
class Store:
    """Where the voteflow processes of a stage keep votes: one Redis or a
    Redis Cluster (every node with ``appendfsync always``, as `voteflow up`
    runs its Redis), and a PostgreSQL with the migrated database "bench"."""

    postgres: PostgresServer
    database_url: str
    redis_url: str
    redis_nodes: list[RedisServer]  # a cluster's every node, replicas included
    cluster: bool

    @property
    def postgres_pid(self) -> int:
        assert self.postgres.pid is not None
        return self.postgres.pid

    @property
    def redis_pids(self) -> list[int]:
        pids = [node.pid for node in self.redis_nodes]
        if None in pids:
            raise RuntimeError("a Redis server of the bench is not running")
        return [pid for pid in pids if pid is not None]

    def env(self, prefix: str) -> dict[str, str]:
        """The VOTEFLOW_* settings of a voteflow process on this store, its keys under `prefix`."""
        return {
            "VOTEFLOW_DATABASE_URL": self.database_url,
            "VOTEFLOW_REDIS_URL": self.redis_url,
            "VOTEFLOW_REDIS_CLUSTER": "true" if self.cluster else "false",
            "VOTEFLOW_KEY_PREFIX": prefix,
            "VOTEFLOW_STREAM_SHARDS": str(SHARDS),
            "VOTEFLOW_LOG_LEVEL": "WARNING",
        }

    def keys(self, prefix: str) -> Keys:
        return Keys(prefix, SHARDS, cluster=self.cluster)

    def client(self, stack: ExitStack) -> redis.Redis | redis.RedisCluster:
        """A client for the bench's own reads (stream lengths, backlogs), closed with `stack`."""
        kind = redis.RedisCluster if self.cluster else redis.Redis
        client = kind.from_url(self.redis_url, socket_timeout=60)
        stack.callback(client.close)
        return client

    def compact(self, empty: bool = False) -> None:
        """Let every Redis node rewrite its append-only file, emptied first
        with `empty`, so that each repeat starts alike (with appendfsync
        always, a long file slows appends). FLUSHALL keeps the script cache,
        where the edges' admit.lua lives; a replica follows its master."""
        for node in self.redis_nodes:
            with redis.Redis.from_url(node.url, socket_timeout=60) as plain:
                if empty and plain.info("replication")["role"] == "master":
                    plain.flushall()
                rewrite_aof(plain)

    def stream_entries(self, client: redis.Redis | redis.RedisCluster, prefix: str) -> int:
        pipe = client.pipeline(transaction=False)
        for stream in self.keys(prefix).streams():
            pipe.xlen(stream)
        return sum(pipe.execute())


class Bench:
    """One run's shared state. Everything it starts is registered on `stack`."""

    def __init__(self, options: Options, stack: ExitStack, work_dir: Path) -> None:
        self.options = options
        self.stack = stack
        self.work_dir = work_dir
        self._stores: dict[str, Store] = {}
        self._databases: dict[str, tuple[PostgresServer, str]] = {}
        self._shared: dict[str, object] = {}
        # Each stage's samples so far in this run, by stage number.
        self.samples: dict[int, list[Sample]] = {}

    def share(self, name: str, make: Callable[[], S]) -> S:
        """What several stages share (the pipeline of stages 5-8), made by the first that asks."""
        if name not in self._shared:
            self._shared[name] = make()
        return self._shared[name]  # type: ignore[return-value]

    def store(self, name: str = "shared", masters: int = 0, replicas: int = 0) -> Store:
        """Private servers, started and migrated on first use, by name: one
        Redis, or with `masters` a Redis Cluster of that many masters with
        `replicas` each.

        Stages 1-4 share one; stages 5-8 have their own, so that the memory
        the drain's votes took does not count as theirs. Durable as a
        deployment runs them: PostgreSQL with fsync and synchronous commit.
        """
        found = self._stores.get(name)
        if found is None:
            postgres, url = self.database(name)
            data = self.work_dir / f"{name}-redis"
            if masters:
                cluster = RedisClusterServers(data, masters=masters, replicas=replicas)
                self.stack.enter_context(cluster)
                found = Store(postgres, url, cluster.url, cluster.servers, cluster=True)
            else:
                one = RedisServer(data, appendonly=True, appendfsync="always")
                self.stack.enter_context(one)
                found = Store(postgres, url, one.url, [one], cluster=False)
            self._stores[name] = found
        return found

    def database(self, name: str) -> tuple[PostgresServer, str]:
        """A private PostgreSQL and the URL of its migrated database "bench",
        started on first use, by name (store(name) uses the same one)."""
        found = self._databases.get(name)
        if found is None:
            # Commit timestamps let the end-to-end stages read when each
            # vote's transaction committed (pg_xact_commit_timestamp).
            postgres = self.stack.enter_context(
                PostgresServer(
                    self.work_dir / f"{name}-postgres", settings={"track_commit_timestamp": "on"}
                )
            )
            sql(postgres.url, 'CREATE DATABASE "bench"')
            url = database_url(postgres.url, "bench")
            asyncio.run(migrate(url))
            found = self._databases[name] = (postgres, url)
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
