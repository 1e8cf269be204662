"""Redis memory is bounded: a full Redis refuses votes with 503, and loses none.

Each test starts a private Redis of its own (voteflow.servers.RedisServer)
with a small `maxmemory` and `noeviction`, so that filling it touches nothing
else. When Redis is over maxmemory it refuses admit.lua at its first write
("OOM command not allowed when used memory > 'maxmemory'"), before the script
has changed anything; the edge answers that vote 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.cluster import stored_vote_ids
from tests.support import InProcessWorker, create_poll, drain, edge_client
from voteflow.keys import Keys
from voteflow.message import FIELD, decode
from voteflow.servers import RedisServer
from voteflow.settings import Settings

# Small enough to fill in seconds, large enough for Valkey's own ~1 MB.
MAXMEMORY = 4 << 20
WAVE = 200  # votes sent at once
ENOUGH_REFUSALS = 600


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", appendonly=False, maxmemory=MAXMEMORY) as server:
        yield server


@dataclass
class Answer:
    body: dict[str, Any]
    status: int
    retry_after: str | None
    answer: dict[str, Any]


def ballot(poll: dict[str, Any], voter: str) -> dict[str, Any]:
    return {
        "poll_id": poll["id"],
        "option_ids": [poll["options"][len(voter) % 3]["id"]],
        "voter_fingerprint": voter,
        "vote_id": str(uuid.uuid4()),
    }


async def send(client: Any, body: dict[str, Any]) -> Answer:
    response = await client.post("/api/vote", json=body)
    return Answer(body, response.status, response.headers.get("Retry-After"), await response.json())


async def stream_vote_ids(redis: aioredis.Redis, keys: Keys) -> list[str]:
    """The vote_id of every entry in every stream shard."""
    found = []
    for stream in keys.streams():
        for _, fields in await redis.xrange(stream):
            found.append(decode(fields[FIELD]).vote_id)
    return found


async def used_memory(redis: aioredis.Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def test_full_redis_answers_503_with_retry_after_and_every_202_is_in_the_stream(
    small_redis: RedisServer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # No backlog limit: memory, not VOTEFLOW_MAX_BACKLOG, is what runs out. The
    # per-voter limiter is on, so admit.lua's first write is its SET.
    full = replace(settings, redis_url=small_redis.url, max_backlog=0, rate_limit_per_voter=60)
    keys = Keys(full.key_prefix, full.stream_shards)
    redis = aioredis.Redis.from_url(small_redis.url)
    answers: list[Answer] = []
    try:
        async with edge_client(full) as client:
            poll = await create_poll(client)
            while sum(a.status != 202 for a in answers) < ENOUGH_REFUSALS:
                assert len(answers) < 200_000, "Redis never filled up"
                wave = [ballot(poll, f"voter-{len(answers) + n}") for n in range(WAVE)]
                answers += await asyncio.gather(*(send(client, body) for body in wave))
            info = await redis.info("memory")

        assert {a.status for a in answers} == {202, 503}, {a.status for a in answers}
        accepted = {a.body["vote_id"] for a in answers if a.status == 202}
        refused = [a for a in answers if a.status == 503]
        assert all(a.retry_after is not None and int(a.retry_after) >= 1 for a in refused)
        assert all(a.answer["vote_id"] == a.body["vote_id"] for a in refused)
        # Every 202 is in a stream, once; no refused vote is.
        in_stream = await stream_vote_ids(redis, keys)
        assert len(in_stream) == len(set(in_stream))
        assert set(in_stream) == accepted
        # Nothing half-done: a refused vote left no idempotency key (its retry
        # will be queued, not answered "queued" with nothing queued).
        seen = [key async for key in redis.scan_iter(match=f"{full.key_prefix}:seen:*")]
        assert len(seen) == len(accepted)
        assert int(info["maxmemory"]) == MAXMEMORY
        # The operator is told why (once every 10 s at most).
        assert any("is full (maxmemory)" in r.getMessage() for r in caplog.records)
        assert info["maxmemory_policy"] == "noeviction"
        print(
            f"\nRedis at maxmemory {MAXMEMORY >> 20} MiB: {len(accepted)} votes answered 202 "
            f"(all in the streams), {len(refused)} answered 503 with Retry-After, "
            f"used_memory {int(info['used_memory']) / 2**20:.2f} MiB"
        )
    finally:
        await redis.aclose()


async def test_a_worker_started_while_redis_is_full_drains_it_and_refused_votes_count_once(
    small_redis: RedisServer, settings: Settings
) -> None:
    full = replace(settings, redis_url=small_redis.url, max_backlog=0)
    redis = aioredis.Redis.from_url(small_redis.url)
    answers: list[Answer] = []
    try:
        # A worker ran once (it created the consumer groups) and is gone, say
        # restarted: nothing drains the streams while the votes fill Redis.
        async with InProcessWorker(full):
            pass
        async with edge_client(full) as client:
            poll = await create_poll(client)
            while sum(a.status != 202 for a in answers) < WAVE:
                assert len(answers) < 200_000, "Redis never filled up"
                wave = [ballot(poll, f"voter-{len(answers) + n}") for n in range(WAVE)]
                answers += await asyncio.gather(*(send(client, body) for body in wave))
            accepted = {a.body["vote_id"] for a in answers if a.status == 202}
            refused = [a.body for a in answers if a.status == 503]
            full_at = await used_memory(redis)

            # A worker starts while Redis is full (Redis refuses XGROUP CREATE
            # then, even for a group that exists) and drains the streams:
            # acknowledging and trimming are not refused, and free memory.
            async with InProcessWorker(full):
                await drain(redis, full, timeout=120)
                drained_at = await used_memory(redis)
                # The clients retry their refused votes with the same vote_ids.
                retried = await asyncio.gather(*(send(client, body) for body in refused))
                assert {a.status for a in retried} == {202}, {a.status for a in retried}
                await drain(redis, full, timeout=120)

        stored = await stored_vote_ids(full.database_url, poll["id"])
        assert len(stored) == len(set(stored))
        keys = Keys(full.key_prefix, full.stream_shards)
        dead = [await redis.xlen(keys.dead_letters(s)) for s in range(full.stream_shards)]
        assert sum(dead) == 0
        assert set(stored) == accepted | {body["vote_id"] for body in refused}
        print(
            f"\n{len(accepted)} votes filled Redis to {full_at / 2**20:.2f} MiB; after the "
            f"drain {drained_at / 2**20:.2f} MiB; the {len(refused)} refused were retried, "
            f"accepted and all {len(stored)} counted once; 0 lost, 0 dead-lettered"
        )
    finally:
        await redis.aclose()


# What the Redis sizing of docs/guarantees.md rests on: rerun with -s to print the figures.
MEASURED_VOTES = 20_000
# Bounds on the measurement (Valkey 8.1, 64-bit), so the figures in the docs
# cannot drift far unnoticed.
MOST_BYTES_PER_QUEUED_VOTE = 600
MOST_BYTES_PER_REMEMBERED_VOTE = 250


async def test_memory_per_vote_of_the_idempotency_window_and_of_the_backlog(
    tmp_path: Path, settings: Settings
) -> None:
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        # As deployed: the default prefix and shards, no rate-limit keys (they
        # live at most a minute), ballots with the bundled page's fingerprint
        # ("browser-" and a UUID) and client vote_ids.
        measured = replace(
            settings, redis_url=server.url, key_prefix="voteflow", stream_shards=8,
            max_backlog=0, rate_limit_per_ip=0, rate_limit_per_voter=0,
        )  # fmt: skip
        redis = aioredis.Redis.from_url(server.url)
        try:
            async with InProcessWorker(measured):  # creates the consumer groups
                pass
            async with edge_client(measured) as client:
                poll = await create_poll(client)
                before = await used_memory(redis)
                for first in range(0, MEASURED_VOTES, WAVE):
                    wave = [
                        ballot(poll, f"browser-{uuid.uuid4()}")
                        for _ in range(min(WAVE, MEASURED_VOTES - first))
                    ]
                    answers = await asyncio.gather(*(send(client, body) for body in wave))
                    assert {a.status for a in answers} == {202}
                queued = await used_memory(redis)
                async with InProcessWorker(measured):
                    await drain(redis, measured, timeout=120)
                remembered = await used_memory(redis)
            seen = [key async for key in redis.scan_iter(match="voteflow:seen:*", count=1000)]
            lengths = [await redis.xlen(stream) for stream in Keys("voteflow", 8).streams()]
        finally:
            await redis.aclose()
    assert len(seen) == MEASURED_VOTES
    assert sum(lengths) == 0  # trimmed after acknowledgement
    per_queued = (queued - before) / MEASURED_VOTES
    per_remembered = (remembered - before) / MEASURED_VOTES
    print(
        f"\n{MEASURED_VOTES} votes: used_memory {before} B before, {queued} B with all "
        f"queued ({per_queued:.0f} B a vote: stream entry + idempotency key), {remembered} B "
        f"once written and trimmed ({per_remembered:.0f} B a vote: its idempotency key, "
        f"kept VOTEFLOW_IDEMPOTENCY_WINDOW)"
    )
    assert 0 < per_remembered <= MOST_BYTES_PER_REMEMBERED_VOTE
    assert per_remembered < per_queued <= MOST_BYTES_PER_QUEUED_VOTE
