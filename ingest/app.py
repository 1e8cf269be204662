"""The HTTP edge: routes, and the resources they share, opened in one place.

A vote flows request -> validate -> rate-limit and append (one Redis round
trip, pipelined with concurrent requests) -> 202. PostgreSQL is read only on a
poll-cache miss, for admin routes and when a tally snapshot is missing. A vote
for a poll id that names no poll is charged to its address's limit instead
(one Redis round trip of its own, ingest/charge.lua) and answered 404, or 429.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from voteflow.keys import Keys
from voteflow.outages import POSTGRES_DOWN, REDIS_DOWN, is_postgres_outage
from voteflow.redisconn import AnyRedis, Nodes, has_sharded_pubsub, has_waitaof, open_redis
from voteflow.settings import Settings
from voteflow.tally import Tally
from voteflow.timeutil import from_us, now_us

from . import live, pages
from .append import Appender, Limited, Overloaded, Reused, Unavailable
from .clientip import Network, client_ip, limited_as, parse_networks
from .history import MAX_STEP, History, StepTooSmall
from .liveslots import LiveSlots
from .metrics import EdgeMetrics
from .openapi import get_openapi
from .origins import Origins
from .polls import STATES, Cursor, Poll, PollCache, close_poll, create_poll, list_polls
from .results import current_tally, results_csv, tally_from_database
from .serve import read_body, serve
from .share import links, poll_of_code, qr_svg
from .validate import (
    MAX_VOTE_BODY,
    Invalid,
    admit_ballot,
    parse_ballot,
    parse_new_poll,
    require_voter,
    voter_of,
)
from .voters import TokenError, VoterTokens

log = logging.getLogger(__name__)

# Poll creation carries up to 64 labels of 200 characters; votes are checked
# against their own, smaller limit in the vote route.
MAX_BODY = 64 * 1024
# Seconds each dependency has to answer GET /ready.
READY_TIMEOUT = 2.0
# What a client should wait before retrying when Redis or PostgreSQL is away.
RETRY_AFTER_UNAVAILABLE = 1
# Polls per page of GET /api/polls, unless ?limit= says otherwise, and the most.
LIST_LIMIT = 20
MAX_LIST_LIMIT = 100
# Pages are small and change with a deploy: revalidated each time (ETag).
# Assets are revalidated after a few minutes, so a deploy reaches browsers soon.
PAGE_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=300"
# What a client should wait when a shard's backlog is full (shed load).
RETRY_AFTER_OVERLOADED = 2
# A server voteflow depends on is away: 503, never a 4xx.
UNAVAILABLE_ERRORS = POSTGRES_DOWN + REDIS_DOWN
# Redis connections per edge process and per master; a request waits for one
# (never fails) when all are busy, and the appends share a few pipelines.
REDIS_CONNECTIONS = 32
# PostgreSQL connections per edge process (per pool): the edge reads polls
# through a cache and writes only when an admin creates or closes one.
DATABASE_CONNECTIONS = 8


@dataclass(frozen=True, slots=True)
class Edge:
    settings: Settings
    keys: Keys
    redis: AnyRedis
    pool: asyncpg.Pool
    # Reads that need not be fresh (the poll list): VOTEFLOW_DATABASE_READ_URL,
    # a replica say, else the same pool.
    read_pool: asyncpg.Pool
    polls: PollCache
    appender: Appender
    hub: live.TallyHub
    metrics: EdgeMetrics
    proxies: tuple[Network, ...]
    # None: voters are not proven, a ballot's user_id is the client's word.
    voter_tokens: VoterTokens | None
    # The live streams this process holds, per client address and in all.
    live_slots: LiveSlots
    history: History


EDGE = web.AppKey("edge", Edge)
EDGE_SETTINGS = web.AppKey("settings", Settings)
ORIGINS = web.AppKey("origins", Origins)
VOTER_TOKENS: web.AppKey[VoterTokens | None] = web.AppKey("voter_tokens")
METRICS = web.AppKey("metrics", EdgeMetrics)


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def problem(
    status: int, message: str, field: str | None = None, retry_after: int | None = None
) -> web.Response:
    """The one shape of every error the API returns."""
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    if status == 401:
        # RFC 9110: a 401 names the scheme that would succeed.
        headers["WWW-Authenticate"] = 'Bearer realm="voteflow"'
    return json_response(body, status, headers)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count and time every request, and give every error the JSON shape."""
    metrics = request.app[METRICS]
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body too large
        response = problem(exc.status, exc.reason)
        if "Allow" in exc.headers:  # a 405 must name the methods allowed
            response.headers["Allow"] = exc.headers["Allow"]
    except web.RequestPayloadError:  # e.g. a Content-Encoding that does not decode
        response = problem(400, "the body could not be read or decoded")
    except Invalid as exc:
        response = problem(exc.status, exc.message, exc.field)
        response.headers.update(exc.headers)
    except Exception as exc:
        # A server voteflow depends on is away, or PostgreSQL refuses everyone
        # for now (read-only standby, timeouts: by SQLSTATE class, as the
        # workers decide): 503. Anything else is a bug, and stays a 500.
        if not isinstance(exc, UNAVAILABLE_ERRORS) and not is_postgres_outage(exc):
            raise
        log.warning("%s %s: dependency unavailable: %r", request.method, request.path, exc)
        response = problem(
            503, "temporarily unavailable, retry later", None, RETRY_AFTER_UNAVAILABLE
        )
    if response.status == 404 and _is_page(request):
        response = pages.not_found()
    metrics.observe_request(
        _route_name(request), request.method, response.status, time.perf_counter() - started
    )
    return response


def _is_page(request: web.Request) -> bool:
    """An address a person opens in a browser: a 404 there is an HTML page."""
    return request.method in ("GET", "HEAD") and not request.path.startswith(
        ("/api/", "/health", "/ready", "/metrics")
    )


def _require_admin(request: web.Request, edge: Edge) -> None:
    token = edge.settings.admin_token.encode()
    # Never anything but ASCII here: origins.guard answers 401 to any other.
    given = request.headers.get("Authorization", "").encode("ascii", "replace")
    # Constant-time comparison: the time taken must not reveal the token.
    if not token or not hmac.compare_digest(given, b"Bearer " + token):
        raise Invalid(401, None, "an admin bearer token is required")


async def _poll(edge: Edge, request: web.Request) -> Poll:
    raw = request.match_info["poll_id"]
    try:
        poll_id = str(uuid.UUID(raw))
    except ValueError:
        raise Invalid(404, "poll_id", "no such poll") from None
    poll = await edge.polls.get(poll_id)
    if poll is None:
        raise Invalid(404, "poll_id", "no such poll")
    return poll


async def post_poll(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    _require_admin(request, edge)
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise Invalid(413, None, f"a poll body must be at most {MAX_BODY} bytes")
    body = await read_body(request, edge.settings.body_timeout)
    new = parse_new_poll(body, datetime.now(UTC), verifying=edge.voter_tokens is not None)
    poll = await create_poll(
        edge.pool,
        new.question,
        new.options,
        new.allow_multiple_votes,
        new.max_choices,
        new.expiry(),
        new.require_voter_token,
    )
    return json_response(poll.to_json(now_us()), 201)


async def get_poll(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    return json_response((await _poll(edge, request)).to_json(now_us()))


async def post_close(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    _require_admin(request, edge)
    poll_id = (await _poll(edge, request)).id
    closed = await close_poll(edge.pool, poll_id, datetime.now(UTC))
    if closed is None:
        raise Invalid(404, "poll_id", "no such poll")
    edge.polls.invalidate(poll_id)
    try:
        # A plain PUBLISH: on a cluster it reaches every node, and so every edge.
        await edge.redis.execute_command("PUBLISH", edge.keys.polls_changed_channel(), poll_id)
    except REDIS_DOWN as exc:
        # Other edges then refuse the poll's votes once their cached copy
        # expires; the workers refuse any vote received after the close anyway.
        log.warning("could not announce the close of poll %s: %s", poll_id, exc)
    return json_response(closed.to_json(now_us()))


def _token_user(request: web.Request, edge: Edge) -> str | None:
    """The user id a ballot's voter token proves; None when no token came or
    this edge verifies none. A token that proves nothing is a 401."""
    tokens = edge.voter_tokens
    header = request.headers.get("Authorization")
    if tokens is None or header is None:
        return None
    scheme, _, value = header.partition(" ")
    try:
        if scheme.lower() != "bearer" or not value.strip():
            raise TokenError("the Authorization header must be 'Bearer <voter token>'")
        return tokens.verify(value.strip())
    except TokenError as exc:
        # RFC 6750, section 3.1: the client can tell a bad token from none.
        raise Invalid(
            401,
            None,
            str(exc),
            {"WWW-Authenticate": 'Bearer realm="voteflow", error="invalid_token"'},
        ) from None


async def post_vote(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    if request.content_length is not None and request.content_length > MAX_VOTE_BODY:
        edge.metrics.votes_rejected.labels("too_large").inc()
        raise Invalid(413, None, f"a vote body must be at most {MAX_VOTE_BODY} bytes")
    body = await read_body(request, edge.settings.body_timeout)
    if len(body) > MAX_VOTE_BODY:
        edge.metrics.votes_rejected.labels("too_large").inc()
        raise Invalid(413, None, f"a vote body must be at most {MAX_VOTE_BODY} bytes")
    received_us = now_us()
    address = client_ip(request, edge.proxies)
    try:
        ballot = parse_ballot(body)
        token_user = _token_user(request, edge)
        require_voter(ballot, token_user)
        # An address its limiter refused a moment ago for votes for no poll
        # is refused again before the poll is looked up (no PostgreSQL read).
        edge.appender.check_refused(address)
        poll = await edge.polls.get(ballot.poll_id)
        if poll is None:
            # Counts against the address's limit: made-up poll ids are not free.
            await edge.appender.charge(address, ballot.poll_id)
            raise Invalid(404, "poll_id", "no such poll")
        voter = voter_of(ballot, poll, edge.voter_tokens is not None, token_user)
        vote = admit_ballot(ballot, poll, voter, received_us)
    except Invalid as exc:
        edge.metrics.votes_rejected.labels(str(exc.status)).inc()
        raise
    except Limited as exc:
        return _limited(edge, exc)
    try:
        appended = await edge.appender.append(vote, address)
    except Limited as exc:
        return _limited(edge, exc)
    except Reused:
        edge.metrics.votes_rejected.labels("409").inc()
        raise Invalid(
            409, "vote_id", "this vote_id is already queued with another ballot; use a new one"
        ) from None
    except Overloaded:
        edge.metrics.votes_rejected.labels("overloaded").inc()
        return problem(
            503, "voteflow is taking in more votes than it can write; retry shortly", None,
            RETRY_AFTER_OVERLOADED,
        )  # fmt: skip
    except Unavailable:
        edge.metrics.votes_rejected.labels("unavailable").inc()
        # The vote_id lets a client that did not choose one retry idempotently:
        # the append may have happened without being confirmed.
        return json_response(
            {"error": "the vote could not be queued, retry later", "vote_id": vote.vote_id},
            503,
            {"Retry-After": str(RETRY_AFTER_UNAVAILABLE)},
        )
    if appended:
        edge.metrics.votes_accepted.inc()
    else:
        edge.metrics.votes_retried.inc()
    return json_response({"vote_id": vote.vote_id, "status": "queued"}, 202)


def _limited(edge: Edge, exc: Limited) -> web.Response:
    edge.metrics.rate_limited.inc()
    return problem(
        429, "too many votes, slow down", None, max(1, math.ceil(exc.retry_after_ms / 1000))
    )


async def get_polls(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    limit = _limit(request.query.get("limit"))
    state = request.query.get("state", "open")
    if state not in STATES:
        raise Invalid(400, "state", f"state must be one of {', '.join(STATES)}")
    token = request.query.get("cursor")
    after = None
    if token is not None:
        try:
            after = Cursor.decode(token)
        except ValueError:  # binascii.Error and UnicodeDecodeError among them
            raise Invalid(400, "cursor", "not a cursor this API handed out") from None
    page = await list_polls(edge.read_pool, state, after, limit)
    now = now_us()
    return json_response(
        {
            "polls": [
                {**listed.poll.to_json(now), "total_ballots": listed.total_ballots}
                for listed in page.polls
            ],
            "next_cursor": None if page.next is None else page.next.encode(),
        }
    )


def _limit(raw: str | None) -> int:
    if raw is None:
        return LIST_LIMIT
    return _whole_number(raw, "limit", MAX_LIST_LIMIT)


def _whole_number(raw: str, field: str, most: int) -> int:
    """A query parameter's whole number from 1 to `most`, in ASCII digits
    (str.isdigit alone takes "²", which int() refuses)."""
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise Invalid(400, field, f"{field} must be a whole number from 1 to {most}")
    return int(raw)


async def index_page(request: web.Request) -> web.Response:
    return pages.respond(request, "index.html", PAGE_CACHE)


async def admin_page(request: web.Request) -> web.Response:
    # The page itself is public: it asks for the token, and every admin call
    # it makes carries it.
    return pages.respond(request, "admin.html", PAGE_CACHE)


async def poll_page(request: web.Request) -> web.Response:
    await _poll(request.app[EDGE], request)  # 404 for no such poll, as the API
    return pages.respond(request, "poll.html", PAGE_CACHE)


async def present_page(request: web.Request) -> web.Response:
    await _poll(request.app[EDGE], request)  # 404 for no such poll, as the API
    return pages.respond(request, "present.html", PAGE_CACHE)


async def short_link(request: web.Request) -> web.Response:
    poll_id = poll_of_code(request.match_info["code"])
    if poll_id is None or await request.app[EDGE].polls.get(poll_id) is None:
        raise Invalid(404, None, "no such poll")
    return _redirect(302, f"/polls/{poll_id}")


def _public_base(request: web.Request) -> str:
    """The origin share links point at: VOTEFLOW_PUBLIC_URL, else this edge's own."""
    return request.app[EDGE].settings.public_url.rstrip("/") or request.app[ORIGINS].own(request)


async def get_share(request: web.Request) -> web.Response:
    poll = await _poll(request.app[EDGE], request)
    return json_response(links(_public_base(request), poll.id))


async def get_qr(request: web.Request) -> web.Response:
    poll = await _poll(request.app[EDGE], request)
    url = links(_public_base(request), poll.id)["short_url"]
    # Vary: the code holds the origin the request named.
    return web.Response(
        body=qr_svg(url), content_type="image/svg+xml",
        headers={"Cache-Control": "no-cache", "Vary": "Host, X-Forwarded-Host"},
    )  # fmt: skip


async def favicon(request: web.Request) -> web.Response:
    return _redirect(301, "/static/favicon.svg")


def _redirect(status: int, location: str) -> web.Response:
    # Returned, not raised: observe turns aiohttp's raised HTTP exceptions
    # into the API's error shape.
    return web.Response(status=status, headers={"Location": location})


async def get_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name.endswith(".html") or not pages.has(name):
        raise Invalid(404, None, "no such file")
    return pages.respond(request, name, ASSET_CACHE)


async def get_results(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    poll = await _poll(edge, request)
    tally = await current_tally(edge.redis, edge.pool, edge.keys, poll.id)
    return json_response(tally.results(poll.labels))


async def get_history(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    raw = request.query.get("step_s")
    step = None if raw is None else _whole_number(raw, "step_s", MAX_STEP)
    poll = await _poll(edge, request)
    try:
        return json_response(await edge.history.of(poll, step))
    except StepTooSmall as exc:
        raise Invalid(400, "step_s", str(exc)) from None


async def get_results_csv(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    poll = await _poll(edge, request)
    # PostgreSQL's count, not the published snapshot: an export is a record.
    tally = await tally_from_database(edge.pool, poll.id)
    return web.Response(
        text=results_csv(tally, poll.labels),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{_export_name(poll)}.csv"'},
    )


async def get_results_json(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    poll = await _poll(edge, request)
    tally = await tally_from_database(edge.pool, poll.id)
    now = now_us()
    return json_response(
        {
            **tally.results(poll.labels),
            "question": poll.question,
            "allow_multiple_votes": poll.allow_multiple_votes,
            "closed": not poll.is_open(now),
            "closed_at": poll.closed_at,
            "exported_at": from_us(now),
        },
        headers={"Content-Disposition": f'attachment; filename="{_export_name(poll)}.json"'},
    )


def _export_name(poll: Poll) -> str:
    return f"voteflow-poll-{poll.id}-results"


async def get_live(request: web.Request) -> web.StreamResponse:
    return await _watch(request, live.stream)


async def get_live_ws(request: web.Request) -> web.StreamResponse:
    return await _watch(request, live.websocket)


async def _watch(
    request: web.Request,
    serve: Callable[
        [web.Request, live.TallyHub, Poll, Tally, live.Pace], Awaitable[web.StreamResponse]
    ],
) -> web.StreamResponse:
    """A watcher of a poll's live tallies, over SSE or a WebSocket, in one of
    the live slots (held until it leaves), from the current tally on."""
    edge = request.app[EDGE]
    with edge.live_slots.hold(_live_client(request, edge)):
        poll = await _poll(edge, request)
        initial = await current_tally(edge.redis, edge.pool, edge.keys, poll.id)
        return await serve(request, edge.hub, poll, initial, _pace(edge.settings))


def _live_client(request: web.Request, edge: Edge) -> str:
    """Who a live stream counts against: the client address as the per-IP
    rate limit counts it (an IPv6 client by its /64)."""
    return limited_as(client_ip(request, edge.proxies), edge.settings.rate_limit_ipv6_prefix)


def _pace(settings: Settings) -> live.Pace:
    return live.Pace(
        write_timeout=settings.live_write_timeout,
        lifetime=settings.live_max_seconds,
    )


async def get_health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _answers(name: str, check: Awaitable[object]) -> bool:
    """A readiness check: whatever goes wrong, the dependency is not ready.

    The exception's text goes to the log only: it can hold host names,
    addresses and user names, and /ready may be reachable from outside.
    """
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await check
    except Exception as exc:  # a probe reports what fails, it never raises
        log.warning("GET /ready: %s is not answering: %r", name, exc)
        return False
    return True


async def get_ready(request: web.Request) -> web.Response:
    edge = request.app[EDGE]
    failing = [
        name
        for name, check in (
            ("redis", edge.redis.ping()),
            ("postgres", edge.pool.fetchval("SELECT 1")),
        )
        if not await _answers(name, check)
    ]
    if failing:
        return json_response({"status": "unavailable", "failing": failing}, 503)
    return json_response({"status": "ready", "failing": []})


async def get_metrics(request: web.Request) -> web.Response:
    # The edge has no periodic loop: its pool gauges are read at each scrape.
    request.app[METRICS].observe_pool(request.app[EDGE].pool)
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _database_pool(settings: Settings, url: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url, min_size=1, max_size=DATABASE_CONNECTIONS, timeout=5,
        statement_cache_size=settings.database_statement_cache_size,
    )  # fmt: skip


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Open everything the routes share, and close it in reverse on shutdown."""
    settings = app[EDGE_SETTINGS]
    metrics = app[METRICS]
    keys = Keys(settings.key_prefix, settings.stream_shards, settings.redis_cluster)
    redis = open_redis(
        settings, max_connections=REDIS_CONNECTIONS, blocking=True, socket_timeout=5,
        socket_connect_timeout=2, health_check_interval=15,
    )  # fmt: skip
    nodes = Nodes(redis, REDIS_CONNECTIONS)
    pool = await _database_pool(settings, settings.database_url)
    read_pool = pool
    if settings.database_read_url:
        read_pool = await _database_pool(settings, settings.database_read_url)
    polls = PollCache(pool, settings.poll_cache_ttl, metrics)
    appender = Appender(
        nodes,
        keys,
        settings.rate_limit_per_ip,
        settings.rate_limit_per_voter,
        settings.idempotency_window,
        settings.max_backlog,
        settings.redis_min_replicas,
        metrics,
        settings.rate_limit_ipv6_prefix,
    )
    await nodes.start()
    hub = live.TallyHub(
        redis, keys, polls, metrics, 1 / settings.live_updates_per_second, settings.sse_heartbeat,
        settings.live_write_timeout,
        sharded=settings.redis_cluster and await has_sharded_pubsub(redis),
    )  # fmt: skip
    await appender.start(waitaof=bool(settings.redis_min_replicas) and await has_waitaof(redis))
    await hub.start()
    proxies = parse_networks(settings.trusted_proxies)
    live_slots = LiveSlots(settings.live_max_per_address, settings.live_connections, metrics)
    app[EDGE] = Edge(
        settings, keys, redis, pool, read_pool, polls, appender, hub, metrics, proxies,
        app[VOTER_TOKENS], live_slots, History(read_pool),
    )  # fmt: skip
    try:
        yield
    finally:
        await hub.close()
        await appender.close()
        await nodes.close()
        if read_pool is not pool:
            await read_pool.close()
        await pool.close()
        await redis.aclose()


async def _end_live_streams(app: web.Application) -> None:
    # Shutdown waits for running handlers; live streams would never end alone.
    app[EDGE].hub.release_watchers()


def create_app(settings: Settings) -> web.Application:
    settings.require_urls()
    origins = Origins(settings.allowed_origins, parse_networks(settings.trusted_proxies))
    # observe first: the guard's refusals are counted and have the error shape.
    app = web.Application(client_max_size=MAX_BODY, middlewares=[observe, origins.guard])
    app.on_response_prepare.append(origins.mark)
    app[EDGE_SETTINGS] = settings
    app[ORIGINS] = origins
    # Here, not in _resources: a key or secret it cannot use stops the start
    # before anything is opened.
    app[VOTER_TOKENS] = VoterTokens.from_settings(settings)
    app[METRICS] = EdgeMetrics()
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_end_live_streams)
    app.router.add_get("/", index_page)
    app.router.add_get("/admin", admin_page)
    app.router.add_get("/polls/{poll_id}", poll_page)
    app.router.add_get("/polls/{poll_id}/present", present_page)
    app.router.add_get("/static/{name}", get_asset)
    app.router.add_get("/p/{code}", short_link)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/api/polls", get_polls)
    app.router.add_post("/api/polls", post_poll)
    app.router.add_get("/api/polls/{poll_id}", get_poll)
    app.router.add_post("/api/polls/{poll_id}/close", post_close)
    app.router.add_get("/api/polls/{poll_id}/results", get_results)
    app.router.add_get("/api/polls/{poll_id}/history", get_history)
    app.router.add_get("/api/polls/{poll_id}/share", get_share)
    app.router.add_get("/api/polls/{poll_id}/qr.svg", get_qr)
    app.router.add_get("/api/polls/{poll_id}/results.csv", get_results_csv)
    app.router.add_get("/api/polls/{poll_id}/results.json", get_results_json)
    app.router.add_get("/api/polls/{poll_id}/live", get_live)
    app.router.add_get("/api/polls/{poll_id}/ws", get_live_ws)
    app.router.add_post("/api/vote", post_vote)
    app.router.add_get("/health", get_health)
    app.router.add_get("/ready", get_ready)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/api/openapi.json", get_openapi)
    return app


def run(settings: Settings) -> None:
    serve(create_app(settings), settings)
