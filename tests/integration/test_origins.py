"""A web page elsewhere cannot make its visitors vote or call the admin routes.

docs/api.md, "Browsers and other origins": every POST under /api/ is JSON (415
otherwise), a browser's Origin must be the edge's own or one of
VOTEFLOW_ALLOWED_ORIGINS (403 otherwise), preflights are answered for those
alone, and clients without an Origin are unaffected. An Authorization header
that is not ASCII is a 401, never a 500. Each refusal changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import ADMIN, ballot, create_poll, edge_client
from voteflow.keys import Keys
from voteflow.settings import Settings

Client = TestClient[Any, Any]
APP = "https://app.example.com"
EVIL = "https://evil.example"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def allowing(settings: Settings) -> AsyncIterator[Client]:
    """An edge that lets pages of APP (and only them, besides its own) call it."""
    async with edge_client(replace(settings, allowed_origins=f"{APP}, http://localhost:3000")) as c:
        yield c


@pytest.fixture
async def poll(edge: Client) -> dict[str, Any]:
    return await create_poll(edge)


async def queued(redis_client: aioredis.Redis, settings: Settings) -> int:
    keys = Keys(settings.key_prefix, settings.stream_shards)
    return sum([await redis_client.xlen(stream) for stream in keys.streams()])


async def open_polls(client: Client) -> int:
    return len((await (await client.get("/api/polls")).json())["polls"])


def own_origin(client: Client) -> str:
    url = client.make_url("")
    return f"{url.scheme}://{url.host}:{url.port}"


async def assert_refused(response: Any, status: int) -> None:
    assert response.status == status, await response.text()
    body = await response.json()
    assert body["error"] and set(body) <= {"error", "field"}
    assert "Access-Control-Allow-Origin" not in response.headers


# -- 415: JSON only -----------------------------------------------------------------------------

NOT_JSON = [
    None,  # no Content-Type at all
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonp",
    "application/json-patch+json",
    "application/json; charset=latin-1",
]


@pytest.mark.parametrize("content_type", NOT_JSON)
async def test_ballot_not_sent_as_json_is_415_and_appends_nothing(
    edge: Client,
    poll: dict[str, Any],
    redis_client: aioredis.Redis,
    settings: Settings,
    content_type: str | None,
) -> None:
    body = orjson.dumps(ballot(poll))
    headers = {} if content_type is None else {"Content-Type": content_type}
    skip = ["Content-Type"] if content_type is None else []
    response = await edge.post("/api/vote", data=body, headers=headers, skip_auto_headers=skip)
    await assert_refused(response, 415)
    assert "application/json" in (await response.json())["error"]
    assert await queued(redis_client, settings) == 0


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
async def test_ballot_sent_as_json_with_or_without_charset_is_queued(
    edge: Client, poll: dict[str, Any], content_type: str
) -> None:
    body = orjson.dumps(ballot(poll))
    response = await edge.post("/api/vote", data=body, headers={"Content-Type": content_type})
    assert response.status == 202, await response.text()


@pytest.mark.parametrize("content_type", ["text/plain", None])
async def test_admin_calls_not_sent_as_json_are_415_and_change_nothing(
    edge: Client, poll: dict[str, Any], content_type: str | None
) -> None:
    headers = {"Authorization": ADMIN["Authorization"]}
    if content_type is not None:
        headers["Content-Type"] = content_type
    skip = ["Content-Type"] if content_type is None else []
    before = await open_polls(edge)
    new = orjson.dumps({"question": "Q?", "options": ["a", "b"]})
    response = await edge.post("/api/polls", data=new, headers=headers, skip_auto_headers=skip)
    await assert_refused(response, 415)
    response = await edge.post(
        f"/api/polls/{poll['id']}/close", headers=headers, skip_auto_headers=skip
    )
    await assert_refused(response, 415)
    assert await open_polls(edge) == before
    assert (await (await edge.get(f"/api/polls/{poll['id']}")).json())["closed"] is False
    # The same calls as JSON pass: the content type alone was at fault.
    assert (await edge.post(f"/api/polls/{poll['id']}/close", headers=ADMIN)).status == 200


# -- 403: a browser's page of another origin -----------------------------------------------------


@pytest.mark.parametrize("origin", [EVIL, "null", "http://app.example.com", f"{APP}:8443"])
@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
async def test_ballot_from_a_page_of_another_origin_is_403_and_appends_nothing(
    allowing: Client,
    redis_client: aioredis.Redis,
    settings: Settings,
    origin: str,
    content_type: str,
) -> None:
    poll = await create_poll(allowing)
    headers = {"Origin": origin, "Content-Type": content_type}
    response = await allowing.post("/api/vote", data=orjson.dumps(ballot(poll)), headers=headers)
    await assert_refused(response, 403)
    assert origin in (await response.json())["error"]
    assert await queued(redis_client, settings) == 0


async def test_admin_calls_from_a_page_of_another_origin_are_403_and_change_nothing(
    edge: Client, poll: dict[str, Any]
) -> None:
    before = await open_polls(edge)
    headers = {**ADMIN, "Origin": EVIL}
    response = await edge.post(
        "/api/polls", json={"question": "Q?", "options": ["a", "b"]}, headers=headers
    )
    await assert_refused(response, 403)
    response = await edge.post(f"/api/polls/{poll['id']}/close", headers=headers)
    await assert_refused(response, 403)
    assert await open_polls(edge) == before


async def test_ballot_from_the_edges_own_page_is_queued(edge: Client, poll: dict[str, Any]) -> None:
    # A browser sends Origin on a same-origin POST too: the bundled voting page.
    for origin in (own_origin(edge), own_origin(edge).upper()):
        response = await edge.post("/api/vote", json=ballot(poll), headers={"Origin": origin})
        assert response.status == 202, await response.text()
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_ballot_from_an_allowed_origin_is_queued_with_cors_headers(
    allowing: Client,
) -> None:
    poll = await create_poll(allowing)
    response = await allowing.post("/api/vote", json=ballot(poll), headers={"Origin": APP})
    assert response.status == 202, await response.text()
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert "Origin" in response.headers.getall("Vary")
    assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]
    # Its refusals carry them too, so that the page can read why.
    response = await allowing.post(
        "/api/vote", json={**ballot(poll), "option_ids": []}, headers={"Origin": APP}
    )
    assert response.status == 422
    assert response.headers["Access-Control-Allow-Origin"] == APP


async def test_requests_without_origin_are_unaffected(
    allowing: Client, redis_client: aioredis.Redis, settings: Settings
) -> None:
    # Apps, servers and curl send no Origin: nothing changes for them.
    poll = await create_poll(allowing)
    response = await allowing.post("/api/vote", json=ballot(poll))
    assert response.status == 202
    assert "Access-Control-Allow-Origin" not in response.headers
    assert await queued(redis_client, settings) == 1


async def test_reads_from_another_origin_are_served_without_cors_headers(
    edge: Client, poll: dict[str, Any]
) -> None:
    # Reading is public (the browser keeps the answer from the page); only
    # state-changing routes refuse a foreign Origin.
    response = await edge.get(f"/api/polls/{poll['id']}", headers={"Origin": EVIL})
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Origin" in response.headers.getall("Vary")


async def test_own_origin_behind_a_proxy_is_read_from_forwarded_headers_only_if_trusted(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    public = "https://votes.example.org"
    forwarded = {
        "Origin": public,
        "X-Forwarded-Host": "votes.example.org",
        "X-Forwarded-Proto": "https",
    }
    async with edge_client(replace(settings, trusted_proxies="127.0.0.1")) as behind:
        poll = await create_poll(behind)
        response = await behind.post("/api/vote", json=ballot(poll), headers=forwarded)
        assert response.status == 202, await response.text()
    # From a peer that is no trusted proxy, the same headers are a client's say-so.
    async with edge_client(settings) as direct:
        poll = await create_poll(direct)
        response = await direct.post("/api/vote", json=ballot(poll), headers=forwarded)
        await assert_refused(response, 403)
    assert await queued(redis_client, settings) == 1


# -- preflights ----------------------------------------------------------------------------------


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }


@pytest.mark.parametrize("path", ["/api/vote", "/api/polls", "/api/polls/{id}/close"])
async def test_preflight_from_an_allowed_origin_is_answered(allowing: Client, path: str) -> None:
    poll = await create_poll(allowing)
    response = await allowing.options(path.format(id=poll["id"]), headers=preflight(APP))
    assert response.status == 204, await response.text()
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "content-type" in allowed and "authorization" in allowed
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in response.headers.getall("Vary")


async def test_preflight_from_another_origin_is_403(allowing: Client) -> None:
    for origin in (EVIL, "null"):
        response = await allowing.options("/api/vote", headers=preflight(origin))
        await assert_refused(response, 403)
        assert "Origin" in response.headers.getall("Vary")


async def test_options_without_a_preflight_and_unknown_routes_keep_their_answers(
    allowing: Client,
) -> None:
    response = await allowing.options("/api/vote", headers={"Origin": APP})
    assert response.status == 405
    response = await allowing.options("/api/nothing-here", headers=preflight(APP))
    assert response.status == 404


# -- 401: an Authorization header that does not decode -------------------------------------------


async def raw_request(client: Client, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes no HTTP client library would, and read the status and head."""
    url = client.make_url("")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer


@pytest.mark.parametrize("credential", [b"Bearer \xff\xfe\xfd", b"Bearer caf\xc3\xa9", b"\x80"])
@pytest.mark.parametrize("route", ["POST /api/polls", "POST /api/vote", "GET /api/polls"])
async def test_authorization_that_is_not_ascii_is_401_with_www_authenticate(
    edge: Client,
    poll: dict[str, Any],
    redis_client: aioredis.Redis,
    settings: Settings,
    credential: bytes,
    route: str,
) -> None:
    before = await open_polls(edge)
    body = orjson.dumps(
        ballot(poll) if route.endswith("vote") else {"question": "Q?", "options": ["a", "b"]}
    )
    method, path = route.split()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n".encode()
        + b"Authorization: " + credential + b"\r\n"
    )  # fmt: skip
    status, answer = await raw_request(edge, head, body if method == "POST" else b"")
    assert status == 401, answer
    head_text, _, payload = answer.partition(b"\r\n\r\n")
    assert b"\r\nwww-authenticate: bearer" in head_text.lower()
    assert orjson.loads(payload)["error"]
    assert await open_polls(edge) == before
    assert await queued(redis_client, settings) == 0
    assert (await edge.get("/health")).status == 200


async def test_wrong_admin_token_is_401_with_www_authenticate(edge: Client) -> None:
    response = await edge.post(
        "/api/polls",
        json={"question": "Q?", "options": ["a", "b"]},
        headers={"Authorization": "Bearer not-the-token", **JSON},
    )
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_request_without_host_is_judged_by_its_origin_alone(
    edge: Client, poll: dict[str, Any], redis_client: aioredis.Redis, settings: Settings
) -> None:
    # HTTP/1.0 needs no Host: the edge then has no own origin to match, and
    # must not look one up (aiohttp's request.host would call getfqdn()).
    body = orjson.dumps(ballot(poll))
    head = (
        b"POST /api/vote HTTP/1.0\r\nContent-Type: application/json\r\n"
        b"Origin: " + own_origin(edge).encode() + b"\r\n"
    )
    status, answer = await raw_request(edge, head, body)
    assert status == 403, answer
    assert await queued(redis_client, settings) == 0
