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

from voteflow.servers import HOST, free_port

from .stack import Bench, sql
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

        sql(self.database_url, SCHEMA.read_text(encoding="utf-8"))
        insert = "INSERT INTO naive_polls (id, option_ids) VALUES ($1, $2)"
        sql(self.database_url, insert, self.poll_id, self.option_ids)
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
        sql(self.database_url, "TRUNCATE naive_votes")
        sql(self.database_url, "CHECKPOINT")

    def stored(self) -> int:
        return int(sql(self.database_url, "SELECT count(*) FROM naive_votes", answer="fetchval"))
