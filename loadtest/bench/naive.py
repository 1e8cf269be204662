"""Stage 3, the naive baseline: votes/s of ``naive_app`` writing every vote to
PostgreSQL itself (SELECT the poll, DELETE the voter's earlier ballot, INSERT;
three round trips, an asyncpg pool of 10), in the bench's private PostgreSQL
(durable: fsync and synchronous commit on), tables from ``naive.sql``.

Before each repeat the votes table is emptied and a checkpoint taken, so each
repeat starts alike; after it, the rows are counted (every 202 must be one).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import asyncpg

from voteflow.servers import HOST, free_port

from .stack import Bench, run_sql
from .stage import WrkStage

SCHEMA = Path(__file__).with_name("naive.sql")


class Naive(WrkStage):
    number = 3
    name = "naive"
    title = "aiohttp -> PostgreSQL per vote: SELECT poll, DELETE earlier, INSERT (pool of 10)"
    ratio = (2, 3)

    def start(self, bench: Bench) -> None:
        super().start(bench)
        servers = bench.servers()
        self.database_url = servers.database_url
        self.poll_id = str(uuid.uuid4())
        self.option_ids = [str(uuid.uuid4()) for _ in range(4)]

        async def create(conn: asyncpg.Connection) -> None:
            await conn.execute(SCHEMA.read_text(encoding="utf-8"))
            await conn.execute(
                "INSERT INTO naive_polls (id, option_ids) VALUES ($1, $2)",
                self.poll_id,
                self.option_ids,
            )

        run_sql(self.database_url, create)
        port = free_port()
        argv = [sys.executable, "-m", "loadtest.bench.naive_app", "--port", str(port)]
        argv += ["--database-url", self.database_url]
        app = bench.spawn("naive_app", argv, bench.child_env())
        self.url = f"http://{HOST}:{port}"
        app.wait_http(f"{self.url}/health")
        self.server = app
        assert servers.postgres.pid is not None
        self.store_pid = servers.postgres.pid

    def reset(self) -> None:
        async def empty(conn: asyncpg.Connection) -> None:
            await conn.execute("TRUNCATE naive_votes")
            await conn.execute("CHECKPOINT")

        run_sql(self.database_url, empty)

    def stored(self) -> int:
        async def count(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM naive_votes"))

        return run_sql(self.database_url, count)
