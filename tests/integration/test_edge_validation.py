"""Bad input gets a clear error, never a 500, and appends nothing to any stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import ADMIN, create_poll, edge_client
from voteflow.keys import Keys
from voteflow.settings import Settings

Client = TestClient[Any, Any]


async def queued(redis_client: aioredis.Redis, settings: Settings) -> int:
    keys = Keys(settings.key_prefix, settings.stream_shards)
    return sum([await redis_client.xlen(stream) for stream in keys.streams()])


async def vote(client: Client, body: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    if isinstance(body, bytes | str):
        kwargs.setdefault("headers", {"Content-Type": "application/json"})
        response = await client.post("/api/vote", data=body, **kwargs)
    else:
        response = await client.post("/api/vote", json=body, **kwargs)
    return response.status, await response.json()


@pytest.fixture
async def poll(edge: Client) -> dict[str, Any]:
    return await create_poll(edge, options=["A", "B", "C"], max_choices=2)


def ballot(poll: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = {
        "poll_id": poll["id"],
        "option_ids": [poll["options"][0]["id"]],
        "voter_fingerprint": "f",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


BAD_BALLOTS = [
    ("poll_id", {"poll_id": ...}),
    ("poll_id", {"poll_id": 42}),
    ("poll_id", {"poll_id": "not-a-uuid"}),
    ("option_ids", {"option_ids": ...}),
    ("option_ids", {"option_ids": "x"}),
    ("option_ids", {"option_ids": []}),
    ("option_ids", {"option_ids": [1]}),
    ("option_ids", {"option_ids": ["nope"]}),
    ("voter_fingerprint", {"voter_fingerprint": ...}),
    ("voter_fingerprint", {"voter_fingerprint": 7}),
    ("voter_fingerprint", {"voter_fingerprint": ""}),
    ("voter_fingerprint", {"voter_fingerprint": "x" * 129}),
    ("user_id", {"user_id": "x" * 129}),
    ("user_id", {"user_id": ["u"]}),
    ("user_id", {"user_id": "a\x00b"}),
    ("voter_fingerprint", {"voter_fingerprint": "\x00"}),
    ("vote_id", {"vote_id": "not-a-uuid"}),
    ("vote_id", {"vote_id": 5}),
]


@pytest.mark.parametrize(("field", "change"), BAD_BALLOTS)
async def test_malformed_ballot_is_422_naming_the_field_and_appends_nothing(
    edge: Client,
    poll: dict[str, Any],
    redis_client: aioredis.Redis,
    settings: Settings,
    field: str,
    change: dict[str, Any],
) -> None:
    status, body = await vote(edge, ballot(poll, **change))
    assert status == 422
    assert body["field"] == field
    assert body["error"]
    assert await queued(redis_client, settings) == 0


async def test_a_ballot_naming_no_voter_is_422_whether_or_not_its_poll_exists(
    edge: Client, poll: dict[str, Any]
) -> None:
    # The fields on their own first, then the poll (docs/api.md, "When a vote is refused").
    option = poll["options"][0]["id"]
    for poll_id in (poll["id"], str(uuid.uuid4())):
        response = await edge.post("/api/vote", json={"poll_id": poll_id, "option_ids": [option]})
        assert response.status == 422, poll_id
        assert (await response.json())["field"] == "voter_fingerprint"


async def test_duplicate_options_are_422(edge: Client, poll: dict[str, Any]) -> None:
    option = poll["options"][0]["id"]
    status, body = await vote(edge, ballot(poll, option_ids=[option, option]))
    assert (status, body["field"]) == (422, "option_ids")
    assert "duplicates" in body["error"]


async def test_more_options_than_max_choices_is_422(edge: Client, poll: dict[str, Any]) -> None:
    status, body = await vote(edge, ballot(poll, option_ids=[o["id"] for o in poll["options"]]))
    assert (status, body["field"]) == (422, "option_ids")
    assert "at most 2" in body["error"]


async def test_option_of_another_poll_is_422(
    edge: Client, poll: dict[str, Any], redis_client: aioredis.Redis, settings: Settings
) -> None:
    other = await create_poll(edge)
    status, body = await vote(edge, ballot(poll, option_ids=[other["options"][0]["id"]]))
    assert (status, body["field"]) == (422, "option_ids")
    assert await queued(redis_client, settings) == 0


@pytest.mark.parametrize("raw", [b"{", b"not json", b"", b"\xff\xfe", b'{"poll_id": }'])
async def test_malformed_json_is_400(edge: Client, raw: bytes) -> None:
    status, body = await vote(edge, raw, headers={"Content-Type": "application/json"})
    assert status == 400
    assert "JSON" in body["error"]


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"x"', b"null"])
async def test_json_that_is_not_an_object_is_422(edge: Client, raw: bytes) -> None:
    status, _ = await vote(edge, raw)
    assert status == 422


async def test_body_over_4_kib_is_413_even_when_chunked(
    edge: Client, poll: dict[str, Any], redis_client: aioredis.Redis, settings: Settings
) -> None:
    big = ballot(poll, padding="x" * 5000)
    status, body = await vote(edge, big)
    assert status == 413
    assert "4096" in body["error"]

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"padding": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = await edge.post(
        "/api/vote", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status == 413
    assert await queued(redis_client, settings) == 0


async def test_unknown_poll_is_404(edge: Client, poll: dict[str, Any]) -> None:
    status, body = await vote(edge, ballot(poll, poll_id=str(uuid.uuid4())))
    assert (status, body["field"]) == (404, "poll_id")


async def test_vote_on_closed_poll_is_409(
    edge: Client, poll: dict[str, Any], redis_client: aioredis.Redis, settings: Settings
) -> None:
    response = await edge.post(f"/api/polls/{poll['id']}/close", headers=ADMIN)
    assert response.status == 200
    assert (await response.json())["closed"] is True
    status, body = await vote(edge, ballot(poll))
    assert status == 409
    assert "closed" in body["error"]
    assert await queued(redis_client, settings) == 0


async def test_vote_on_expired_poll_is_409(edge: Client) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=1)
    poll = await create_poll(edge, expires_at=expires.isoformat())
    assert (await vote(edge, ballot(poll)))[0] == 202
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    status, _ = await vote(edge, ballot(poll))
    assert status == 409


async def test_rate_limit_per_voter_is_429_with_retry_after(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    limited = replace(settings, rate_limit_per_voter=3, rate_limit_per_ip=0)
    async with edge_client(limited) as client:
        poll = await create_poll(client)
        statuses = [(await client.post("/api/vote", json=ballot(poll))).status for _ in range(3)]
        assert statuses == [202, 202, 202]
        response = await client.post("/api/vote", json=ballot(poll))
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1
        # Another voter is not limited by the first one's allowance.
        other = await client.post("/api/vote", json=ballot(poll, voter_fingerprint="g"))
        assert other.status == 202
    assert await queued(redis_client, settings) == 4


async def test_rate_limit_per_ip_is_429(settings: Settings, redis_client: aioredis.Redis) -> None:
    limited = replace(settings, rate_limit_per_voter=0, rate_limit_per_ip=2)
    async with edge_client(limited) as client:
        poll = await create_poll(client)
        statuses = [
            (await client.post("/api/vote", json=ballot(poll, voter_fingerprint=f"v{i}"))).status
            for i in range(3)
        ]
        assert statuses == [202, 202, 429]
    assert await queued(redis_client, settings) == 2


BAD_POLLS = [
    ("question", {"question": ""}),
    ("question", {"question": 5}),
    ("question", {"question": "q" * 501}),
    ("options", {"options": ["only one"]}),
    ("options", {"options": [f"o{i}" for i in range(65)]}),
    ("options", {"options": ["a", "a"]}),
    ("options", {"options": ["a", ""]}),
    ("options", {"options": ["a", 2]}),
    ("options", {"options": ["a", "b\x00"]}),
    ("question", {"question": "why\x00"}),
    ("options", {"options": "a,b"}),
    ("allow_multiple_votes", {"allow_multiple_votes": "yes"}),
    ("max_choices", {"max_choices": 0}),
    ("max_choices", {"max_choices": 4}),
    ("max_choices", {"max_choices": True}),
    ("max_choices", {"max_choices": 1.5}),
    ("expires_at", {"expires_at": "tomorrow"}),
    ("expires_at", {"expires_at": "2030-01-01T00:00:00"}),
    ("expires_at", {"expires_at": "2001-01-01T00:00:00Z"}),
]


@pytest.mark.parametrize(("field", "change"), BAD_POLLS)
async def test_bad_poll_is_422_naming_the_field(
    edge: Client, field: str, change: dict[str, Any]
) -> None:
    body = {"question": "Q?", "options": ["a", "b", "c"], **change}
    response = await edge.post("/api/polls", json=body, headers=ADMIN)
    assert response.status == 422
    assert (await response.json())["field"] == field


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "x"}])
async def test_admin_routes_need_the_token(
    edge: Client, poll: dict[str, Any], headers: dict[str, str]
) -> None:
    headers = {**headers, "Content-Type": "application/json"}
    body = {"question": "Q?", "options": ["a", "b"]}
    assert (await edge.post("/api/polls", json=body, headers=headers)).status == 401
    response = await edge.post(f"/api/polls/{poll['id']}/close", headers=headers)
    assert response.status == 401
    assert (await edge.get(f"/api/polls/{poll['id']}")).status == 200
    assert (await (await edge.get(f"/api/polls/{poll['id']}")).json())["closed"] is False


async def test_unknown_poll_routes_are_404(edge: Client) -> None:
    for path in (
        f"/api/polls/{uuid.uuid4()}",
        f"/api/polls/{uuid.uuid4()}/results",
        "/api/polls/x",
    ):
        response = await edge.get(path)
        assert response.status == 404
        assert (await response.json())["error"]
    response = await edge.post(f"/api/polls/{uuid.uuid4()}/close", headers=ADMIN)
    assert response.status == 404
