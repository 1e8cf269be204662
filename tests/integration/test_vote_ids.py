"""A vote_id names one ballot: a retry of it is answered 202 and counted once;
reused for another ballot it is refused 409, whichever voter or shard, and
nothing is queued. (On a Redis Cluster: tests/system/test_redis_cluster.py.)"""

from __future__ import annotations

import uuid
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import InProcessWorker, create_poll, drain, results
from voteflow.keys import Keys
from voteflow.message import Vote
from voteflow.settings import Settings

Client = TestClient[Any, Any]


async def queued(redis: aioredis.Redis, settings: Settings) -> int:
    """Entries in the vote streams (no worker has read any yet)."""
    keys = Keys(settings.key_prefix, settings.stream_shards)
    return sum([await redis.xlen(stream) for stream in keys.streams()])


async def test_a_vote_id_reused_for_another_ballot_is_409_and_queues_nothing(
    edge: Client, settings: Settings, redis_client: aioredis.Redis
) -> None:
    poll = await create_poll(edge, allow_multiple_votes=True, max_choices=2)
    options = [option["id"] for option in poll["options"]]
    vote_id = str(uuid.uuid4())
    first = {
        "poll_id": poll["id"],
        "option_ids": options[:2],
        "voter_fingerprint": "ann",
        "vote_id": vote_id,
    }
    assert (await edge.post("/api/vote", json=first)).status == 202
    # The same ballot again, its options in another order: a retry.
    retry = {**first, "option_ids": options[1::-1]}
    assert (await edge.post("/api/vote", json=retry)).status == 202
    assert await queued(redis_client, settings) == 1
    # Another choice, another poll, or another voter under the same vote_id.
    other_poll = await create_poll(edge)
    shards = settings.stream_shards
    ann = Vote(vote_id, poll["id"], "f:ann", (), 0).shard(shards)
    far = next(n for n in range(100) if Vote(vote_id, "", f"f:v{n}", (), 0).shard(shards) != ann)
    for reused in (
        {**first, "option_ids": [options[2]]},
        {**first, "poll_id": other_poll["id"], "option_ids": [other_poll["options"][0]["id"]]},
        {**first, "voter_fingerprint": "bob"},
        {**first, "voter_fingerprint": f"v{far}"},  # a voter of another stream shard
    ):
        response = await edge.post("/api/vote", json=reused)
        assert response.status == 409, reused
        assert (await response.json())["field"] == "vote_id"
    assert await queued(redis_client, settings) == 1
    async with InProcessWorker(settings):
        await drain(redis_client, settings)
    result = await results(edge, poll["id"])
    assert result["total_ballots"] == 1
    assert {o["id"]: o["votes"] for o in result["options"]} == {
        options[0]: 1,
        options[1]: 1,
        options[2]: 0,
    }
