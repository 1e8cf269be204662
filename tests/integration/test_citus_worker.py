"""VOTEFLOW_DATABASE_CITUS: workers write each poll of a batch with its own
cast_poll_votes call (what Citus routes to the node holding the poll), and
count exactly what one cast_vote_atomic call would. Shown on plain PostgreSQL:
Citus cannot be installed here (docs/scaling.md)."""

from __future__ import annotations

import dataclasses

import asyncpg
from redis import asyncio as aioredis

from tests.support import InProcessWorker, create_poll, drain, edge_client, recount, results
from voteflow.settings import Settings


async def test_a_citus_worker_counts_every_poll_of_a_batch_with_per_poll_calls(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    citus = dataclasses.replace(settings, database_citus=True, batch_size=500)
    # Without the batch function, a worker that still called it would fail.
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("DROP FUNCTION cast_vote_atomic(vote_in[])")
    finally:
        await conn.close()
    async with edge_client(citus) as edge:
        polls = [await create_poll(edge) for _ in range(3)]
        expected: dict[str, dict[str, int]] = {}
        # Queued before the worker starts, so that its batches span the polls;
        # each voter votes twice, the second ballot replacing the first.
        for p, poll in enumerate(polls):
            ids = [o["id"] for o in poll["options"]]
            expected[poll["id"]] = {i: 0 for i in ids}
            for n in range(40):
                for option in (n % 3, (n + p) % 3):
                    body = {
                        "poll_id": poll["id"],
                        "option_ids": [ids[option]],
                        "voter_fingerprint": f"voter-{n}",
                    }
                    assert (await edge.post("/api/vote", json=body)).status == 202
                expected[poll["id"]][ids[(n + p) % 3]] += 1
        async with InProcessWorker(citus):
            await drain(redis_client, citus)
        for poll in polls:
            counted = await results(edge, poll["id"])
            assert {o["id"]: o["votes"] for o in counted["options"]} == expected[poll["id"]]
            assert counted["total_ballots"] == 40
            assert await recount(settings.database_url, poll["id"]) == expected[poll["id"]]
