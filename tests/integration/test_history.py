"""A poll's tally over time (GET /api/polls/{id}/history), kept by the writers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from ingest.history import MAX_POINTS
from tests.support import InProcessWorker, create_poll, drain, edge_client, results, votes_by_option
from voteflow.settings import Settings

Client = TestClient[Any, Any]


async def _vote_and_commit(
    edge: Client, settings: Settings, poll: dict[str, Any], voters: list[tuple[str, int]]
) -> None:
    for voter, option in voters:
        body = {
            "poll_id": poll["id"],
            "option_ids": [poll["options"][option]["id"]],
            "voter_fingerprint": voter,
        }
        response = await edge.post("/api/vote", json=body)
        assert response.status == 202, await response.text()
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await drain(redis, settings)
    finally:
        await redis.aclose()


async def _next_second() -> None:
    now = datetime.now(UTC)
    await asyncio.sleep(1.05 - now.microsecond / 1e6)


async def _history(edge: Client, poll_id: str, **query: str) -> dict[str, Any]:
    response = await edge.get(f"/api/polls/{poll_id}/history", params=query)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_the_history_is_the_cumulative_tally_of_each_second_votes_were_committed(
    edge: Client, worker: InProcessWorker, settings: Settings
) -> None:
    poll = await create_poll(edge)
    ids = [option["id"] for option in poll["options"]]
    await _vote_and_commit(edge, settings, poll, [("a", 0), ("b", 0)])
    await _next_second()
    # b changes their mind (a single-choice poll): a replaced ballot, not a new one.
    await _vote_and_commit(edge, settings, poll, [("c", 1), ("b", 2)])
    await asyncio.sleep(1.1)  # past the edge's cache of a history

    history = await _history(edge, poll["id"], step_s="1")
    assert history["poll_id"] == poll["id"] and history["step_s"] == 1
    points = history["points"]
    tallies = [(p["total_ballots"], p["votes"]) for p in points]
    # The first wave committed in a second before the second wave began: its
    # tally is a point of its own. (A wave's batches may straddle a second,
    # which adds a point before it.)
    assert (2, {ids[0]: 2, ids[1]: 0, ids[2]: 0}) in tallies
    assert tallies[-1] == (3, {ids[0]: 1, ids[1]: 1, ids[2]: 1})
    times = [datetime.fromisoformat(p["t"]) for p in points]
    assert times == sorted(set(times)) and all(t.microsecond == 0 for t in times)
    assert [n for n, _ in tallies] == sorted(n for n, _ in tallies)  # ballots only grow
    final = await results(edge, poll["id"])
    assert points[-1]["votes"] == votes_by_option(final)

    # Kept in PostgreSQL: another edge (a restart, say) answers the same.
    async with edge_client(settings) as other:
        assert await _history(other, poll["id"], step_s="1") == history


async def _record(database_url: str, poll_id: str, rows: list[tuple[datetime, int]]) -> None:
    """History rows as the writers would leave them: each (second, ballots),
    every ballot for the poll's first option."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO tally_history (poll_id, at, total_ballots, votes)"
            " VALUES ($1, $2, $3, ARRAY[$3, 0, 0]::bigint[])",
            [(poll_id, at, n) for at, n in rows],
        )
    finally:
        await conn.close()


async def test_a_step_keeps_each_bucket_s_last_tally_at_the_bucket_s_start(
    edge: Client, settings: Settings
) -> None:
    poll = await create_poll(edge)
    start = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)
    seconds = [0, 5, 59, 60, 61, 200]
    await _record(
        settings.database_url,
        poll["id"],
        [(start + timedelta(seconds=s), n) for n, s in enumerate(seconds, 1)],
    )
    history = await _history(edge, poll["id"], step_s="60")
    assert [(p["t"], p["total_ballots"]) for p in history["points"]] == [
        ("2026-12-01T10:00:00+00:00", 3),
        ("2026-12-01T10:01:00+00:00", 5),
        ("2026-12-01T10:03:00+00:00", 6),  # 10:02 had no change: it kept 5
    ]
    ones = await _history(edge, poll["id"])  # the smallest step that fits: 1 s
    assert ones["step_s"] == 1
    assert [p["total_ballots"] for p in ones["points"]] == [1, 2, 3, 4, 5, 6]


async def test_a_step_too_fine_for_the_poll_s_span_is_a_400_naming_the_smallest(
    edge: Client, settings: Settings
) -> None:
    poll = await create_poll(edge)
    start = datetime(2026, 12, 1, tzinfo=UTC)
    # Two days, a change every 10 minutes: 289 rows over 172,801 seconds.
    rows = [(start + timedelta(minutes=10 * n), n + 1) for n in range(289)]
    await _record(settings.database_url, poll["id"], rows)
    response = await edge.get(f"/api/polls/{poll['id']}/history", params={"step_s": "1"})
    assert response.status == 400
    body = await response.json()
    assert body["field"] == "step_s"
    smallest = -(-172_801 // (MAX_POINTS - 1))
    assert body["error"] == f"use a step_s of at least {smallest} for this poll"
    chosen = await _history(edge, poll["id"])
    assert chosen["step_s"] == smallest
    assert len(chosen["points"]) == 289 and chosen["points"][-1]["total_ballots"] == 289
    hourly = await _history(edge, poll["id"], step_s="3600")
    assert len(hourly["points"]) == 49
    assert [p["total_ballots"] for p in hourly["points"][:2]] == [6, 12]


async def test_a_poll_nobody_voted_on_has_no_points(edge: Client) -> None:
    poll = await create_poll(edge)
    assert await _history(edge, poll["id"]) == {"poll_id": poll["id"], "step_s": 1, "points": []}


async def test_a_bad_step_or_poll_is_refused_naming_it(edge: Client) -> None:
    poll = await create_poll(edge)
    for step in ("0", "-1", "1.5", "x", "²", "86401", ""):
        response = await edge.get(f"/api/polls/{poll['id']}/history", params={"step_s": step})
        assert response.status == 400, step
        assert (await response.json())["field"] == "step_s"
    response = await edge.get("/api/polls/00000000-0000-4000-8000-000000000000/history")
    assert response.status == 404
    assert (await response.json())["field"] == "poll_id"
