"""The vote rules of docs/guarantees.md, each proven through the whole path (HTTP to tallies)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import (
    ADMIN,
    InProcessWorker,
    create_poll,
    drain,
    pause,
    recount,
    results,
    votes_by_option,
)
from voteflow.keys import GROUP, Keys
from voteflow.message import FIELD, Vote, decode
from voteflow.settings import Settings
from voteflow.timeutil import now_us

Client = TestClient[Any, Any]


async def cast(client: Client, poll: dict[str, Any], *labels: str, **fields: Any) -> str:
    ids = {o["label"]: o["id"] for o in poll["options"]}
    body = {"poll_id": poll["id"], "option_ids": [ids[label] for label in labels], **fields}
    response = await client.post("/api/vote", json=body)
    assert response.status == 202, await response.text()
    vote_id: str = (await response.json())["vote_id"]
    return vote_id


async def tallies(client: Client, poll: dict[str, Any]) -> dict[str, int]:
    by_id = votes_by_option(await results(client, poll["id"]))
    return {o["label"]: by_id[o["id"]] for o in poll["options"]}


async def settle(
    client: Client, redis_client: aioredis.Redis, settings: Settings, poll: dict[str, Any]
) -> dict[str, Any]:
    """Drain the streams; check results equal a recount (rule 7); return them."""
    await drain(redis_client, settings)
    result = await results(client, poll["id"])
    assert votes_by_option(result) == await recount(settings.database_url, poll["id"])
    return result


async def test_voter_is_user_id_if_present_else_fingerprint(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    poll = await create_poll(edge)
    await cast(edge, poll, "A", user_id="alice", voter_fingerprint="device-1")
    # Same user on another device: the same voter, so this replaces the first.
    await cast(edge, poll, "B", user_id="alice", voter_fingerprint="device-2")
    # A fingerprint equal to a user id is another voter.
    await cast(edge, poll, "C", voter_fingerprint="alice")
    result = await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 0, "B": 1, "C": 1}
    assert result["total_ballots"] == 2


async def test_voter_ids_of_the_longest_allowed_length_are_counted(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    poll = await create_poll(edge)
    await cast(edge, poll, "A", user_id="u" * 128)
    await cast(edge, poll, "B", voter_fingerprint="f" * 128)
    result = await settle(edge, redis_client, settings, poll)
    assert result["total_ballots"] == 2


async def test_later_ballot_replaces_earlier_in_single_vote_poll(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    poll = await create_poll(edge)
    await cast(edge, poll, "A", voter_fingerprint="v")
    await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 1, "B": 0, "C": 0}
    await cast(edge, poll, "C", voter_fingerprint="v")
    await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 0, "B": 0, "C": 1}


async def test_every_distinct_vote_id_counts_in_multiple_vote_poll(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    poll = await create_poll(edge, allow_multiple_votes=True)
    for label in ("A", "A", "B"):
        await cast(edge, poll, label, voter_fingerprint="v")
    result = await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 2, "B": 1, "C": 0}
    assert result["total_ballots"] == 3


@pytest.mark.parametrize("multiple", [False, True])
async def test_retried_vote_id_counts_once(
    edge: Client,
    worker: InProcessWorker,
    redis_client: aioredis.Redis,
    settings: Settings,
    multiple: bool,
) -> None:
    poll = await create_poll(edge, allow_multiple_votes=multiple)
    vote_id = str(uuid.uuid4())
    answers = await asyncio.gather(
        *(cast(edge, poll, "B", voter_fingerprint="v", vote_id=vote_id) for _ in range(5))
    )
    assert answers == [vote_id] * 5
    result = await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 0, "B": 1, "C": 0}
    assert result["total_ballots"] == 1


async def test_late_replay_of_replaced_ballot_does_not_count(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    poll = await create_poll(edge)
    first = str(uuid.uuid4())
    await cast(edge, poll, "A", voter_fingerprint="v", vote_id=first)
    await cast(edge, poll, "B", voter_fingerprint="v")
    # The client retries its first ballot after it had already voted again,
    # once before and once after the workers committed everything.
    await cast(edge, poll, "A", voter_fingerprint="v", vote_id=first)
    await settle(edge, redis_client, settings, poll)
    await cast(edge, poll, "A", voter_fingerprint="v", vote_id=first)
    await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 0, "B": 1, "C": 0}


async def test_ballot_with_k_options_adds_one_to_each(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    poll = await create_poll(edge, options=["A", "B", "C", "D"], max_choices=3)
    await cast(edge, poll, "A", "C", "D", voter_fingerprint="v")
    await cast(edge, poll, "C", voter_fingerprint="w")
    result = await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 1, "B": 0, "C": 2, "D": 1}
    assert result["total_ballots"] == 2


async def test_vote_received_before_close_counts_even_if_written_after(
    edge: Client, settings: Settings, redis_client: aioredis.Redis
) -> None:
    poll = await create_poll(edge)
    await cast(edge, poll, "A", voter_fingerprint="early")
    response = await edge.post(f"/api/polls/{poll['id']}/close", headers=ADMIN)
    assert response.status == 200
    late = await edge.post(
        "/api/vote",
        json={
            "poll_id": poll["id"],
            "option_ids": [poll["options"][1]["id"]],
            "voter_fingerprint": "late",
        },
    )
    assert late.status == 409
    # Only now does a worker write the vote received before the close.
    async with InProcessWorker(settings):
        await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 1, "B": 0, "C": 0}


async def test_vote_received_after_close_is_not_counted_by_the_workers(
    edge: Client, worker: InProcessWorker, settings: Settings, redis_client: aioredis.Redis
) -> None:
    """An edge whose cached poll is stale may queue a vote after the close;
    the workers judge it by its receive time and record it uncounted."""
    poll = await create_poll(edge)
    response = await edge.post(f"/api/polls/{poll['id']}/close", headers=ADMIN)
    assert response.status == 200
    keys = Keys(settings.key_prefix, settings.stream_shards)
    vote = Vote(str(uuid.uuid4()), poll["id"], "f:stale", (poll["options"][0]["id"],), now_us())
    await redis_client.xadd(keys.stream(vote.shard(keys.shards)), {FIELD: vote.encode()})
    await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 0, "B": 0, "C": 0}
    conn = await asyncpg.connect(settings.database_url)
    try:
        counted = await conn.fetchval("SELECT counted FROM votes WHERE vote_id = $1", vote.vote_id)
    finally:
        await conn.close()
    assert counted is False


async def test_message_redelivered_after_its_batch_committed_counts_once(
    edge: Client, worker: InProcessWorker, settings: Settings, redis_client: aioredis.Redis
) -> None:
    """A worker commits a batch and dies before XACK; another one reclaims it."""
    poll = await create_poll(edge)
    keys = Keys(settings.key_prefix, settings.stream_shards)
    # This test plays the dying worker: it reads the votes before the running
    # worker can, commits them, and never acknowledges them.
    await pause(worker)
    await cast(edge, poll, "A", voter_fingerprint="v1")
    await cast(edge, poll, "B", voter_fingerprint="v2")
    taken = 0
    conn = await asyncpg.connect(settings.database_url)
    try:
        for stream in keys.streams():
            for _, entries in await redis_client.xreadgroup(
                GROUP, "dying", {stream: ">"}, count=100
            ):
                votes = [decode(fields[FIELD]) for _, fields in entries]
                await conn.fetch("SELECT * FROM cast_vote_atomic($1::vote_in[])", as_rows(votes))
                taken += len(entries)
    finally:
        await conn.close()
    assert taken == 2
    await asyncio.sleep(settings.claim_idle_ms / 1000 + 0.1)
    assert await worker.reclaim() == 2
    result = await settle(edge, redis_client, settings, poll)
    assert await tallies(edge, poll) == {"A": 1, "B": 1, "C": 0}
    assert result["total_ballots"] == 2


def as_rows(votes: list[Vote]) -> list[tuple[Any, ...]]:
    return [(v.vote_id, v.poll_id, v.voter, list(v.option_ids), v.received_us) for v in votes]


async def test_two_workers_racing_on_the_same_voters_count_by_the_rules(
    edge: Client, settings: Settings, redis_client: aioredis.Redis
) -> None:
    poll = await create_poll(edge, options=["A", "B", "C", "D"])
    labels = ["A", "B", "C", "D"]
    final: dict[str, str] = {}

    async def voter(n: int) -> None:
        # Each voter changes their mind several times, in order.
        for k in range(4):
            label = labels[(n + k) % 4]
            await cast(edge, poll, label, voter_fingerprint=f"voter-{n}")
            final[f"voter-{n}"] = label

    await asyncio.gather(*(voter(n) for n in range(60)))
    async with InProcessWorker(settings), InProcessWorker(settings):
        await settle(edge, redis_client, settings, poll)
    expected = {label: sum(1 for v in final.values() if v == label) for label in labels}
    assert await tallies(edge, poll) == expected
