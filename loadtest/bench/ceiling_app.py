"""Stage 1's server, the HTTP ceiling: what aiohttp + uvloop + orjson in one
process (the edge's process model) can answer, with no storage at all.

It reads and parses the vote body and answers 202 with the edge's reply
shape; nothing is checked or kept. No middleware, no metrics.

    python -m loadtest.bench.ceiling_app --port 8081
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import orjson
from aiohttp import web

from .appserve import arguments, serve


def _json(body: object, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def post_vote(request: web.Request) -> web.Response:
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _json({"error": "body is not valid JSON"}, 400)
    vote_id = data.get("vote_id") if isinstance(data, dict) else None
    return _json({"vote_id": vote_id or str(uuid.uuid4()), "status": "queued"}, 202)


async def get_health(request: web.Request) -> web.Response:
    return _json({"status": "ok"}, 200)


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/api/vote", post_vote)
    app.router.add_get("/health", get_health)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    args = arguments(__doc__ or "", argv)
    serve(create_app(), args.host, args.port)


if __name__ == "__main__":
    main()
