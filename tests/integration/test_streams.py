"""The streams stay bounded: trimmed as votes are written, shed when full."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import (
    InProcessWorker,
    ballot,
    create_poll,
    drain,
    edge_client,
    pause,
    results,
)
from voteflow.keys import GROUP, Keys
from voteflow.settings import Settings

Client = TestClient[Any, Any]


async def cast_many(client: Client, poll: dict[str, Any], first: int, n: int) -> None:
    for start in range(first, first + n, 50):
        bodies = [ballot(poll, f"v{i}") for i in range(start, min(start + 50, first + n))]
        statuses = await asyncio.gather(*(client.post("/api/vote", json=b) for b in bodies))
        assert {r.status for r in statuses} == {202}


async def test_trimming_keeps_every_entry_not_yet_acknowledged(
    edge: Client, redis_client: aioredis.Redis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix, settings.stream_shards)
    poll = await create_poll(edge, allow_multiple_votes=True)
    async with InProcessWorker(settings) as worker:
        await cast_many(edge, poll, 0, 800)
        await drain(redis_client, settings)
        # Written entries leave the streams as they are acknowledged (Redis
        # trims whole blocks of up to 100 entries, so a few stay behind).
        assert (
            sum([await redis_client.xlen(s) for s in keys.streams()])
            <= 100 * settings.stream_shards
        )
        await pause(worker)
        # A consumer takes a few entries of each shard and stalls...
        await cast_many(edge, poll, 800, 40)
        stalled = {}
        for stream in keys.streams():
            for _, entries in await redis_client.xreadgroup(GROUP, "stalled", {stream: ">"}, 3):
                stalled[stream] = [entry_id for entry_id, _ in entries]
        assert sum(len(ids) for ids in stalled.values()) == 3 * settings.stream_shards
        # ...while another worker writes and acknowledges everything else.
        await cast_many(edge, poll, 840, 400)
        async with InProcessWorker(settings):
            await until_only_stalled_pending(redis_client, keys, len(stalled))
            for stream, ids in stalled.items():
                for entry_id in ids:
                    assert await redis_client.xrange(stream, entry_id, entry_id), entry_id
            # The stalled entries are still there to be reclaimed and counted.
            await asyncio.sleep(settings.claim_idle_ms / 1000 + 0.1)
            assert await worker.reclaim() == 3 * settings.stream_shards
            await drain(redis_client, settings)
    assert (await results(edge, poll["id"]))["total_ballots"] == 1240


async def until_only_stalled_pending(redis: aioredis.Redis, keys: Keys, shards: int) -> None:
    """Wait until every entry but the stalled consumer's is acknowledged."""
    async with asyncio.timeout(30):
        while True:
            groups = [g for s in keys.streams() for g in await redis.xinfo_groups(s)]
            if (
                all(g["lag"] == 0 for g in groups)
                and sum(g["pending"] for g in groups) == 3 * shards
            ):
                return
            await asyncio.sleep(0.05)


async def test_a_full_shard_sheds_votes_with_503_until_it_drains(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    settings = replace(settings, max_backlog=20)
    keys = Keys(settings.key_prefix, settings.stream_shards)
    async with edge_client(settings) as client:
        poll = await create_poll(client, allow_multiple_votes=True)
        statuses = []
        for i in range(200):
            response = await client.post("/api/vote", json=ballot(poll, f"v{i}"))
            statuses.append(response.status)
            if response.status == 503:
                assert int(response.headers["Retry-After"]) >= 1
                assert "retry" in (await response.json())["error"]
        assert set(statuses) == {202, 503}
        accepted = statuses.count(202)
        # No shard grew past its limit.
        assert all([await redis_client.xlen(s) <= 20 for s in keys.streams()])
        assert accepted <= 20 * settings.stream_shards
        async with InProcessWorker(settings):
            await drain(redis_client, settings)
            response = await client.post("/api/vote", json=ballot(poll, "after"))
            assert response.status == 202
            await drain(redis_client, settings)
        assert (await results(client, poll["id"]))["total_ballots"] == accepted + 1
