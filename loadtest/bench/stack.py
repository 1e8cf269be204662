"""What the stages share: the run's options, its private PostgreSQL and Redis,
and every process it starts, each stopped at the end in reverse order."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg

from voteflow.migrate import migrate
from voteflow.servers import PostgresServer, RedisServer

from .procs import Child

REPO = Path(__file__).resolve().parents[2]
DATABASE = "bench"
# Seconds any one statement of the bench's own may take (a CHECKPOINT, say).
COMMAND_TIMEOUT = 120.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Options:
    repeats: int
    duration: int  # seconds of each measured wrk run
    warmup: int  # seconds of the unmeasured run before a stage's first repeat
    connections: int
    threads: int  # wrk's
    wrk: str  # wrk's path


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


class Bench:
    """One run's shared state. Everything it starts is registered on `stack`."""

    def __init__(self, options: Options, stack: ExitStack, work_dir: Path) -> None:
        self.options = options
        self.stack = stack
        self.work_dir = work_dir
        self._servers: Servers | None = None

    def servers(self) -> Servers:
        """The private servers, started and migrated on first use.

        Durable as a deployment runs them: PostgreSQL with fsync and
        synchronous commit, Redis with ``appendfsync always`` as `voteflow up`.
        """
        if self._servers is None:
            postgres = self.stack.enter_context(PostgresServer(self.work_dir / "postgres"))
            redis = self.stack.enter_context(
                RedisServer(self.work_dir / "redis", appendonly=True, appendfsync="always")
            )

            async def create(conn: asyncpg.Connection) -> None:
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')

            run_sql(postgres.url, create)
            database_url = _database_url(postgres.url, DATABASE)
            asyncio.run(migrate(database_url))
            self._servers = Servers(postgres, redis, database_url)
        return self._servers

    def child_env(self, **extra: str) -> dict[str, str]:
        """The bench's environment without any VOTEFLOW_* setting, plus `extra`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEFLOW_")}
        env.update(extra)
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        """Start a process in the repository; it is stopped when the run ends."""
        log_path = self.work_dir / f"{name}.log"
        return self.stack.enter_context(Child(name, argv, env, REPO, log_path))
