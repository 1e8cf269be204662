"""The whole path in one process: edge -> stream -> worker -> PostgreSQL -> tallies."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import (
    InProcessWorker,
    create_poll,
    drain,
    edge_client,
    recount,
    results,
    votes_by_option,
)
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


async def test_after_a_small_batch_the_consumer_lingers_and_commits_the_next_votes_together(
    settings: Settings,
) -> None:
    # One shard, so that every vote goes to the one consumer; a long linger,
    # so that what happens within it is plain whatever the machine's load.
    settings = replace(settings, stream_shards=1, batch_linger_ms=1000)
    async with edge_client(settings) as edge, InProcessWorker(settings) as worker:
        poll = await create_poll(edge)
        option = poll["options"][0]["id"]
        registry = worker.writer.metrics.registry

        def batches() -> float | None:
            return registry.get_sample_value("voteflow_batches_total")

        async def vote(voter: str) -> None:
            ballot = {"poll_id": poll["id"], "option_ids": [option], "voter_fingerprint": voter}
            response = await edge.post("/api/vote", json=ballot)
            assert response.status == 202, await response.text()

        async def total() -> int:
            return int((await results(edge, poll["id"]))["total_ballots"])

        # A vote on a quiet stream is read at once: the consumer lingers only
        # after a batch, not before a read.
        await vote("first")
        sent = time.monotonic()
        while await total() < 1:
            await asyncio.sleep(0.02)
        assert time.monotonic() - sent < 0.9
        assert batches() == 1
        # Votes that arrive while it lingers wait for it, and go in one call.
        for voter in ("second", "third", "fourth"):
            await vote(voter)
            await asyncio.sleep(0.05)
        while await total() < 4:
            await asyncio.sleep(0.02)
        assert batches() == 2
