"""Dead letters hold only votes at fault, and a dead-lettered vote can come back.

A vote goes to the dead letters when PostgreSQL refuses it written alone (a
data error), when the rules reject it, or when it has outlived
VOTEFLOW_MAX_DELIVERIES holders; its idempotency key goes with it, so that
the client's retry is queued again, and `voteflow deadletters requeue` sends
dead letters back to be counted exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import InProcessWorker, backlog, ballot, create_poll, drain, results
from voteflow.keys import GROUP, Keys
from voteflow.message import FIELD, decode
from voteflow.settings import Settings

Client = TestClient[Any, Any]


@pytest.fixture
async def refusing(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A trigger that makes PostgreSQL refuse (SQLSTATE P0001) any vote whose
    voter is "f:poison"; dropped with `DROP TRIGGER refuse_poison ON votes`."""
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute(
        """
        CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.voter = 'f:poison' THEN RAISE EXCEPTION 'poison'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_poison BEFORE INSERT ON votes
            FOR EACH ROW EXECUTE FUNCTION refuse_poison();
        """
    )
    yield conn
    await conn.close()


async def dead_letters(redis: aioredis.Redis, keys: Keys) -> list[dict[bytes, bytes]]:
    return [
        fields
        for shard in range(keys.shards)
        for _, fields in await redis.xrange(keys.dead_letters(shard))
    ]


async def test_a_vote_refused_alone_is_dead_lettered_at_once_and_its_batch_is_counted(
    edge: Client, redis_client: aioredis.Redis, settings: Settings, refusing: asyncpg.Connection
) -> None:
    """PostgreSQL refuses the batch holding the bad vote; the worker splits it
    until the bad vote stands alone, commits the rest and dead-letters that
    one with the SQLSTATE, without waiting for reclaims or deliveries."""
    keys = Keys(settings.key_prefix, settings.stream_shards)
    poll = await create_poll(edge, allow_multiple_votes=True)
    voters = ["poison", *(f"v{i}" for i in range(40))]
    for voter in voters:
        assert (await edge.post("/api/vote", json=ballot(poll, voter))).status == 202
    async with InProcessWorker(settings):
        await drain(redis_client, settings)
    dead = await dead_letters(redis_client, keys)
    assert [fields[b"reason"].decode() for fields in dead] == ["refused: P0001 poison"]
    assert decode(dead[0][FIELD]).voter == "f:poison"
    assert (await results(edge, poll["id"]))["total_ballots"] == 40


async def test_a_dead_lettered_votes_retry_is_queued_again_and_counted_once(
    edge: Client, redis_client: aioredis.Redis, settings: Settings, refusing: asyncpg.Connection
) -> None:
    """Dead-lettering releases the vote_id: the client's retry with it is
    queued (not answered "already queued" with nothing queued), and once the
    cause is gone it counts, once."""
    keys = Keys(settings.key_prefix, settings.stream_shards)
    poll = await create_poll(edge, allow_multiple_votes=True)
    body = {**ballot(poll, "poison"), "vote_id": str(uuid.uuid4())}
    async with InProcessWorker(settings) as worker:
        assert (await edge.post("/api/vote", json=body)).status == 202
        await drain(redis_client, settings)
        assert len(await dead_letters(redis_client, keys)) == 1
        await refusing.execute("DROP TRIGGER refuse_poison ON votes")
        response = await edge.post("/api/vote", json=body)
        assert response.status == 202
        assert (await response.json())["vote_id"] == body["vote_id"]
        await drain(redis_client, settings)
        # A second retry is a duplicate again: the key is set once more.
        assert (await edge.post("/api/vote", json=body)).status == 202
        assert await backlog(redis_client, settings) == 0
        assert worker.writer.metrics.votes.labels("counted")._value.get() == 1
    assert (await results(edge, poll["id"]))["total_ballots"] == 1


async def test_a_vote_outliving_max_deliveries_holders_is_dead_lettered_and_released(
    edge: Client, redis_client: aioredis.Redis, settings: Settings
) -> None:
    """Each holder that died with the vote counts a delivery; past
    VOTEFLOW_MAX_DELIVERIES the reclaim job stops handing it to another."""
    settings = replace(settings, max_deliveries=2)
    keys = Keys(settings.key_prefix, settings.stream_shards)
    poll = await create_poll(edge)
    body = {**ballot(poll, "unlucky"), "vote_id": str(uuid.uuid4())}
    assert (await edge.post("/api/vote", json=body)).status == 202
    lengths = [await redis_client.xlen(keys.stream(s)) for s in range(keys.shards)]
    shard = lengths.index(1)
    stream = keys.stream(shard)
    # Delivered to a first holder, then claimed by two more, all gone.
    await redis_client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    [[_, [(entry_id, _)]]] = await redis_client.xreadgroup(GROUP, "gone-1", {stream: ">"})
    for holder in ("gone-2", "gone-3"):
        await redis_client.xclaim(stream, GROUP, holder, 0, [entry_id])
    async with InProcessWorker(settings) as worker:
        await asyncio.sleep(settings.claim_idle_ms / 1000 + 0.1)
        await worker.reclaim()
        await drain(redis_client, settings)
        dead = await dead_letters(redis_client, keys)
        assert [fields[b"reason"] for fields in dead] == [b"max_deliveries"]
        # Released: the retry is queued again, and counted.
        assert (await edge.post("/api/vote", json=body)).status == 202
        await drain(redis_client, settings)
    assert (await results(edge, poll["id"]))["total_ballots"] == 1
