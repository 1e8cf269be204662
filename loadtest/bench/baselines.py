"""What the edge is measured against, and the small servers that measure it.

- Stage 1, the HTTP ceiling: a bare aiohttp + uvloop + orjson app in one
  process (the edge's process model) that parses the vote and answers 202
  with the edge's reply shape, checking and keeping nothing: what the edge
  could answer if appending to Redis cost nothing.
- Stage 3, the naive baseline, the design voteflow replaces: the same app
  writing each vote to PostgreSQL itself through an asyncpg pool of 10, three
  round trips on one pooled connection, each its own (autocommit) statement:
  SELECT the poll (no cache: does it exist, is it open, are the options its
  own), DELETE the voter's earlier ballot, INSERT the new one. Tables from
  ``naive.sql``; before each repeat they are emptied and a checkpoint taken,
  after it the rows are counted (every 202 must be one).

Both apps are served as the edge is: one process, uvloop, no access log, a
listen backlog of 4096, until SIGTERM or SIGINT::

    python -m loadtest.bench.baselines {ceiling,naive} --port 8081 [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import orjson
import uvloop
from aiohttp import web

from ingest.validate import Invalid, parse_ballot, require_voter
from voteflow.servers import HOST, free_port

from .stack import Bench, sql
from .stage import WrkStage

SCHEMA = Path(__file__).with_name("naive.sql")
POOL_SIZE = 10
POOL = web.AppKey("pool", asyncpg.Pool)
# As the edge (ingest/serve.py): a burst's connections wait in the kernel.
BACKLOG = 4096


class HttpCeiling(WrkStage):
    number = 1
    name = "http-ceiling"
    unit = "req/s"
    title = "bare aiohttp + uvloop + orjson app, one process: parse the vote, answer 202"
    app = "ceiling"

    def start(self, bench: Bench) -> None:
        super().start(bench)
        port = free_port()
        argv = [sys.executable, "-m", __name__, self.app, "--port", str(port)]
        self.server = bench.spawn(self.app, [*argv, *self.app_args()], bench.child_env())
        self.url = f"http://{HOST}:{port}"
        self.server.wait_http(f"{self.url}/health")
        # The ceiling checks nothing: any ids do.
        self.poll_id = str(uuid.uuid4())
        self.option_ids = [str(uuid.uuid4()) for _ in range(4)]

    def app_args(self) -> list[str]:
        return []


class Naive(HttpCeiling):
    number = 3
    name = "naive"
    unit = "votes/s"
    title = "aiohttp -> PostgreSQL per vote: SELECT poll, DELETE earlier, INSERT (pool of 10)"
    ratio = (2, 3)
    app = "naive"

    def app_args(self) -> list[str]:
        store = self.bench.store()
        self.database_url = store.database_url
        self.store_pids = [store.postgres_pid]
        return ["--database-url", self.database_url]

    def start(self, bench: Bench) -> None:
        super().start(bench)
        sql(self.database_url, SCHEMA.read_text(encoding="utf-8"))
        insert = "INSERT INTO naive_polls (id, option_ids) VALUES ($1, $2)"
        sql(self.database_url, insert, self.poll_id, self.option_ids)

    def reset(self) -> None:
        sql(self.database_url, "TRUNCATE naive_votes")
        sql(self.database_url, "CHECKPOINT")

    def stored(self) -> int:
        return int(sql(self.database_url, "SELECT count(*) FROM naive_votes", answer="fetchval"))


# -- the apps ------------------------------------------------------------------


def _json(body: object, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def ceiling_vote(request: web.Request) -> web.Response:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json({"error": "body is not valid JSON"}, 400)
    vote_id = data.get("vote_id") if isinstance(data, dict) else None
    return _json({"vote_id": vote_id or str(uuid.uuid4()), "status": "queued"}, 202)


async def naive_vote(request: web.Request) -> web.Response:
    try:  # the edge's own parsing, so that the two differ in storage only
        ballot = parse_ballot(await request.read())
        require_voter(ballot, None)
    except Invalid as exc:
        return _json({"error": exc.message}, exc.status)
    voter = ballot.user_id or ballot.voter_fingerprint
    vote_id = ballot.vote_id or str(uuid.uuid4())
    options = list(ballot.option_ids)
    async with request.app[POOL].acquire() as conn:
        poll = await conn.fetchrow(
            "SELECT option_ids::text[], max_choices, closed_at FROM naive_polls WHERE id = $1",
            ballot.poll_id,
        )
        if poll is None:
            return _json({"error": "no such poll"}, 404)
        if poll["closed_at"] is not None:
            return _json({"error": "the poll is closed"}, 409)
        if len(options) > poll["max_choices"] or not set(options) <= set(poll["option_ids"]):
            return _json({"error": "not options of this poll"}, 422)
        await conn.execute(
            "DELETE FROM naive_votes WHERE poll_id = $1 AND voter = $2", ballot.poll_id, voter
        )
        await conn.execute(
            "INSERT INTO naive_votes (vote_id, poll_id, voter, option_ids) VALUES ($1, $2, $3, $4)",
            vote_id, ballot.poll_id, voter, options,
        )  # fmt: skip
    return _json({"vote_id": vote_id, "status": "queued"}, 202)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing. asyncpg's default sends a reset
    query, a fourth round trip per vote; the handler leaves no session state
    behind, so the baseline is spared it (the bench errs in its favour)."""


def create_app(kind: str, database_url: str = "") -> web.Application:
    async def pool(app: web.Application) -> AsyncIterator[None]:
        app[POOL] = await asyncpg.create_pool(
            database_url, min_size=POOL_SIZE, max_size=POOL_SIZE, reset=_keep_session
        )
        try:
            yield
        finally:
            await app[POOL].close()

    async def health(request: web.Request) -> web.Response:
        return _json({"status": "ok"}, 200)

    app = web.Application()
    if kind == "naive":
        app.cleanup_ctx.append(pool)
    app.router.add_post("/api/vote", naive_vote if kind == "naive" else ceiling_vote)
    app.router.add_get("/health", health)
    return app


async def serve(app: web.Application, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=BACKLOG).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("ceiling", "naive"))
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", default="", help="PostgreSQL, for the naive app")
    args = parser.parse_args(argv)
    uvloop.run(serve(create_app(args.kind, args.database_url), args.host, args.port))


if __name__ == "__main__":
    main()
