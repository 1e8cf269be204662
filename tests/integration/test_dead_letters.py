"""Dead letters hold only votes at fault, and a dead-lettered vote can come back.

A vote goes to the dead letters when PostgreSQL refuses it written alone (a
data error), when the rules reject it, or when it has outlived
VOTEFLOW_MAX_DELIVERIES holders; its idempotency key goes with it, so that
the client's retry is queued again, and `voteflow deadletters requeue` sends
dead letters back to be counted exactly once.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import InProcessWorker, backlog, ballot, create_poll, drain, results
from voteflow.cli import main
from voteflow.cli import main as cli_main
from voteflow.deadletters import Choice
from voteflow.deadletters import run as run_deadletters
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


async def deadletters(settings: Settings, action: str, **choice: Any) -> Any:
    """`voteflow deadletters <action> --json` with these options; its JSON."""
    out, err = io.StringIO(), io.StringIO()
    status = await run_deadletters(
        settings, action, Choice(**choice), as_json=True, out=out, err=err
    )
    assert status == 0, err.getvalue()
    return orjson.loads(out.getvalue())


async def test_requeued_dead_letters_are_counted_exactly_once(
    edge: Client, redis_client: aioredis.Redis, settings: Settings, refusing: asyncpg.Connection
) -> None:
    keys = Keys(settings.key_prefix, settings.stream_shards)
    first = await create_poll(edge, allow_multiple_votes=True)
    second = await create_poll(edge, allow_multiple_votes=True)
    bodies = {
        poll["id"]: {**ballot(poll, "poison", option=1), "vote_id": str(uuid.uuid4())}
        for poll in (first, second)
    }
    async with InProcessWorker(settings):
        for poll in (first, second):
            assert (await edge.post("/api/vote", json=bodies[poll["id"]])).status == 202
            for i in range(5):
                assert (await edge.post("/api/vote", json=ballot(poll, f"v{i}"))).status == 202
        await drain(redis_client, settings)
        listed = await deadletters(settings, "list")
        assert sorted(row["vote_id"] for row in listed) == sorted(
            body["vote_id"] for body in bodies.values()
        )
        assert all(row["reason"] == "refused: P0001 poison" for row in listed)
        (only,) = await deadletters(settings, "list", poll_id=first["id"])
        assert only["vote_id"] == bodies[first["id"]]["vote_id"]
        assert await deadletters(settings, "list", reason="max_deliveries") == []

        await refusing.execute("DROP TRIGGER refuse_poison ON votes")
        requeued = await deadletters(settings, "requeue", poll_id=first["id"])
        assert [row["vote_id"] for row in requeued["requeued"]] == [only["vote_id"]]
        await drain(redis_client, settings)
        # Once: nothing is left to requeue for that poll.
        assert (await deadletters(settings, "requeue", poll_id=first["id"]))["requeued"] == []
        # The client's retry of a requeued vote is a duplicate, as for any queued vote.
        assert (await edge.post("/api/vote", json=bodies[first["id"]])).status == 202
        assert await backlog(redis_client, settings) == 0

        # The second poll's voter retried before the requeue: counted once all the same.
        assert (await edge.post("/api/vote", json=bodies[second["id"]])).status == 202
        await drain(redis_client, settings)
        assert len((await deadletters(settings, "requeue"))["requeued"]) == 1
        await drain(redis_client, settings)
    assert await dead_letters(redis_client, keys) == []
    for poll in (first, second):
        result = await results(edge, poll["id"])
        assert result["total_ballots"] == 6
        assert {o["id"]: o["votes"] for o in result["options"]}[poll["options"][1]["id"]] == 1


async def test_deadletters_refuses_a_bad_poll_id_or_shard(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["deadletters", "list", "--poll", "nope"])
    assert exited.value.code == 2
    assert "argument --poll: must be a poll id (a UUID), got 'nope'" in capsys.readouterr().err
    err = io.StringIO()
    status = await run_deadletters(settings, "list", Choice(shard=settings.stream_shards), err=err)
    assert status == 2 and "--shard must be 0 to" in err.getvalue()


def test_voteflow_deadletters_list_prints_each_with_its_reason(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = Keys(settings.key_prefix, settings.stream_shards)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.xadd(
            keys.dead_letters(1),
            {b"entry": b"1-0", FIELD: b"junk", b"reason": b"undecodable: not JSON"},
        )
    finally:
        client.close()
    monkeypatch.setenv("VOTEFLOW_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("VOTEFLOW_KEY_PREFIX", settings.key_prefix)
    monkeypatch.setenv("VOTEFLOW_STREAM_SHARDS", str(settings.stream_shards))
    assert main(["deadletters", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shard 1 ") and lines[0].endswith(
        "undecodable message: undecodable: not JSON"
    )
    assert lines[-1] == "1 dead letter(s)"
