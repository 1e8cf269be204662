"""A ballot against its poll: the answers that depend on the poll, the rate
limits and the admin token. Each field's own rules, and any other input, are
tests/integration/test_hostile_input.py's."""

from __future__ import annotations

import asyncio
import uuid
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
