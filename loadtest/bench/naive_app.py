"""Stage 3's server, the naive baseline: the design voteflow replaces.

One aiohttp + uvloop + orjson process, like the edge, writing each vote
straight to PostgreSQL through an asyncpg pool of 10 connections. Per vote,
three round trips on one pooled connection, each its own (autocommit)
statement:

1. SELECT the poll (no cache): does it exist, is it open, are the options its own;
2. DELETE the voter's earlier ballot in that poll;
3. INSERT the new ballot;

then 202. Tables: ``naive.sql``, created by the bench.

    python -m loadtest.bench.naive_app --port 8082 --database-url postgresql://...
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from .appserve import arguments, serve

POOL_SIZE = 10
POOL = web.AppKey("pool", asyncpg.Pool)

_SELECT_POLL = "SELECT option_ids, max_choices, closed_at FROM naive_polls WHERE id = $1"
_DELETE_EARLIER = "DELETE FROM naive_votes WHERE poll_id = $1 AND voter = $2"
_INSERT_VOTE = (
    "INSERT INTO naive_votes (vote_id, poll_id, voter, option_ids) VALUES ($1, $2, $3, $4)"
)


def _json(body: object, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _uuid(value: Any) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def post_vote(request: web.Request) -> web.Response:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json({"error": "body is not valid JSON"}, 400)
    if not isinstance(data, dict):
        return _json({"error": "body must be a JSON object"}, 422)
    poll_id = _uuid(data.get("poll_id"))
    raw_options = data.get("option_ids")
    options = [_uuid(o) for o in raw_options] if isinstance(raw_options, list) else []
    voter = data.get("user_id") or data.get("voter_fingerprint")
    vote_id = _uuid(data["vote_id"]) if "vote_id" in data else uuid.uuid4()
    if poll_id is None or vote_id is None or not isinstance(voter, str):
        return _json({"error": "poll_id, vote_id or the voter is missing or malformed"}, 422)
    if not options or None in options or len(set(options)) != len(options):
        message = "option_ids must be distinct option ids"
        return _json({"error": message, "field": "option_ids"}, 422)
    async with request.app[POOL].acquire() as conn:
        poll = await conn.fetchrow(_SELECT_POLL, poll_id)  # round trip 1
        if poll is None:
            return _json({"error": "no such poll", "field": "poll_id"}, 404)
        if poll["closed_at"] is not None:
            return _json({"error": "the poll is closed"}, 409)
        if len(options) > poll["max_choices"] or not set(options) <= set(poll["option_ids"]):
            return _json({"error": "not options of this poll", "field": "option_ids"}, 422)
        await conn.execute(_DELETE_EARLIER, poll_id, voter)  # round trip 2
        await conn.execute(_INSERT_VOTE, vote_id, poll_id, voter, options)  # round trip 3
    return _json({"vote_id": str(vote_id), "status": "queued"}, 202)


async def get_health(request: web.Request) -> web.Response:
    return _json({"status": "ok"}, 200)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing. asyncpg's default sends a reset
    query, a fourth round trip per vote; the handler leaves no session state
    behind, so the baseline is spared it (the bench errs in its favour)."""


def create_app(database_url: str) -> web.Application:
    async def pool(app: web.Application) -> AsyncIterator[None]:
        app[POOL] = await asyncpg.create_pool(
            database_url, min_size=POOL_SIZE, max_size=POOL_SIZE, reset=_keep_session
        )
        try:
            yield
        finally:
            await app[POOL].close()

    app = web.Application()
    app.cleanup_ctx.append(pool)
    app.router.add_post("/api/vote", post_vote)
    app.router.add_get("/health", get_health)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    args = arguments(__doc__ or "", argv)
    serve(create_app(args.database_url), args.host, args.port)


if __name__ == "__main__":
    main()
