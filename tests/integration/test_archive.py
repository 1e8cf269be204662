"""Closed polls stay listed (GET /api/polls?state=) and every poll's results
can be exported (results.csv, results.json), counted as PostgreSQL holds them."""

from __future__ import annotations

import csv
import io
from typing import Any

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import ADMIN, InProcessWorker, create_poll, drain, expire, recount
from voteflow.settings import Settings

Client = TestClient[Any, Any]


async def _vote(edge: Client, poll: dict[str, Any], voter: str, *options: int) -> None:
    body = {
        "poll_id": poll["id"],
        "option_ids": [poll["options"][n]["id"] for n in options],
        "voter_fingerprint": voter,
    }
    response = await edge.post("/api/vote", json=body)
    assert response.status == 202, await response.text()


async def _drained(settings: Settings) -> None:
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await drain(redis, settings)
    finally:
        await redis.aclose()


async def _listed(edge: Client, state: str | None) -> list[tuple[str, int]]:
    query = {} if state is None else {"state": state}
    response = await edge.get("/api/polls", params=query)
    assert response.status == 200, await response.text()
    return [(p["question"], p["total_ballots"]) for p in (await response.json())["polls"]]


async def test_closed_and_expired_polls_are_listed_as_closed_with_their_ballots(
    edge: Client, worker: InProcessWorker, settings: Settings
) -> None:
    open_poll = await create_poll(edge, question="open")
    closed = await create_poll(edge, question="closed")
    expired = await create_poll(edge, question="expired")
    await _vote(edge, closed, "a", 0)
    await _vote(edge, closed, "b", 1)
    await _vote(edge, open_poll, "a", 2)
    await _drained(settings)
    response = await edge.post(f"/api/polls/{closed['id']}/close", headers=ADMIN)
    assert response.status == 200
    await expire(settings.database_url, expired["id"])

    assert await _listed(edge, None) == [("open", 1)]
    assert await _listed(edge, "open") == [("open", 1)]
    assert await _listed(edge, "closed") == [("expired", 0), ("closed", 2)]
    assert await _listed(edge, "all") == [("expired", 0), ("closed", 2), ("open", 1)]


async def test_a_page_of_closed_polls_leads_to_the_next_by_cursor(edge: Client) -> None:
    for n in range(3):
        poll = await create_poll(edge, question=f"closed {n}")
        assert (await edge.post(f"/api/polls/{poll['id']}/close", headers=ADMIN)).status == 200
    await create_poll(edge, question="still open")
    first = await (await edge.get("/api/polls", params={"state": "closed", "limit": "2"})).json()
    assert [p["question"] for p in first["polls"]] == ["closed 2", "closed 1"]
    assert all(p["closed"] for p in first["polls"])
    query = {"state": "closed", "limit": "2", "cursor": first["next_cursor"]}
    second = await (await edge.get("/api/polls", params=query)).json()
    assert [p["question"] for p in second["polls"]] == ["closed 0"]
    assert second["next_cursor"] is None


async def test_an_unknown_state_is_a_400_naming_it(edge: Client) -> None:
    for state in ("archived", "", "OPEN"):
        response = await edge.get("/api/polls", params={"state": state})
        assert response.status == 400, state
        assert (await response.json())["field"] == "state"


async def test_results_export_as_csv_holds_each_option_and_its_share_of_ballots(
    edge: Client, worker: InProcessWorker, settings: Settings
) -> None:
    poll = await create_poll(edge, allow_multiple_votes=True, max_choices=2)
    await _vote(edge, poll, "a", 0, 1)
    await _vote(edge, poll, "b", 0)
    await _vote(edge, poll, "c", 2)
    await _drained(settings)
    response = await edge.get(f"/api/polls/{poll['id']}/results.csv")
    assert response.status == 200
    assert response.content_type == "text/csv"
    assert response.charset == "utf-8"
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="voteflow-poll-{poll["id"]}-results.csv"'
    )
    rows = list(csv.reader(io.StringIO(await response.text())))
    assert rows[0] == ["option_id", "label", "votes", "share_of_ballots"]
    ids = [option["id"] for option in poll["options"]]
    # Three ballots, four choices: the shares are of ballots and add up to 4/3.
    assert rows[1:] == [
        [ids[0], "A", "2", "0.6667"],
        [ids[1], "B", "1", "0.3333"],
        [ids[2], "C", "1", "0.3333"],
    ]
    counted = await recount(settings.database_url, poll["id"])
    assert {row[0]: int(row[2]) for row in rows[1:]} == counted


async def test_results_export_as_json_says_whether_the_poll_is_closed(
    edge: Client, worker: InProcessWorker, settings: Settings
) -> None:
    poll = await create_poll(edge, question="Lunch?", options=["Soup", "Salad"])
    await _vote(edge, poll, "a", 1)
    await _drained(settings)
    before = await (await edge.get(f"/api/polls/{poll['id']}/results.json")).json()
    assert before["question"] == "Lunch?"
    assert before["closed"] is False and before["closed_at"] is None
    assert [(o["label"], o["votes"]) for o in before["options"]] == [("Soup", 0), ("Salad", 1)]
    assert before["total_ballots"] == 1
    assert (await edge.post(f"/api/polls/{poll['id']}/close", headers=ADMIN)).status == 200
    response = await edge.get(f"/api/polls/{poll['id']}/results.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    after = await response.json()
    assert after["closed"] is True and after["closed_at"] is not None
    assert after["options"] == before["options"]
    assert after["exported_at"] >= before["exported_at"]


async def test_a_label_a_spreadsheet_would_run_is_exported_as_text(edge: Client) -> None:
    poll = await create_poll(
        edge, options=['=HYPERLINK("http://example.invalid")', "@SUM(1)", "ok"]
    )
    response = await edge.get(f"/api/polls/{poll['id']}/results.csv")
    rows = list(csv.reader(io.StringIO(await response.text())))
    assert [row[1] for row in rows[1:]] == [
        '\'=HYPERLINK("http://example.invalid")',
        "'@SUM(1)",
        "ok",
    ]


async def test_exports_of_no_such_poll_are_a_404(edge: Client) -> None:
    for suffix in ("results.csv", "results.json"):
        response = await edge.get(f"/api/polls/00000000-0000-4000-8000-000000000000/{suffix}")
        assert response.status == 404, suffix
        assert (await response.json())["field"] == "poll_id"
