"""The whole path in one process: edge -> stream -> worker -> PostgreSQL -> tallies."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import InProcessWorker, create_poll, drain, recount, results, votes_by_option
from voteflow.settings import Settings


async def test_a_vote_is_queued_committed_and_shown_in_results(
    edge: TestClient[Any, Any], worker: InProcessWorker, settings: Settings
) -> None:
    poll = await create_poll(edge)
    option = poll["options"][1]["id"]
    response = await edge.post(
        "/api/vote",
        json={"poll_id": poll["id"], "option_ids": [option], "voter_fingerprint": "fp-1"},
    )
    assert response.status == 202, await response.text()
    body = await response.json()
    assert body["status"] == "queued"
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await drain(redis, settings)
    finally:
        await redis.aclose()
    result = await results(edge, poll["id"])
    assert votes_by_option(result) == {o["id"]: int(o["id"] == option) for o in poll["options"]}
    assert result["total_ballots"] == 1
    assert votes_by_option(result) == await recount(settings.database_url, poll["id"])
