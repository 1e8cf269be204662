"""The poll list (GET /api/polls) and the web pages the edge serves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from tests.support import ADMIN, create_poll, expire

Client = TestClient[Any, Any]


async def _pages(edge: Client, limit: int) -> list[list[str]]:
    """Every page of the list, as question lists, following next_cursor."""
    found: list[list[str]] = []
    cursor = None
    while True:
        query = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        response = await edge.get("/api/polls", params=query)
        assert response.status == 200, await response.text()
        page = await response.json()
        found.append([poll["question"] for poll in page["polls"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return found


async def test_list_pages_open_polls_newest_first_by_cursor(
    edge: Client, database_url: str
) -> None:
    for n in range(5):
        await create_poll(edge, question=f"poll {n}")
    closed = await create_poll(edge, question="closed one")
    response = await edge.post(f"/api/polls/{closed['id']}/close", headers=ADMIN)
    assert response.status == 200
    expired = await create_poll(edge, question="expired one")
    await expire(database_url, expired["id"])
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    await create_poll(edge, question="expires later", expires_at=later)

    first = await edge.get("/api/polls")
    assert first.status == 200
    body = await first.json()
    assert [poll["question"] for poll in body["polls"]] == [
        "expires later", "poll 4", "poll 3", "poll 2", "poll 1", "poll 0",
    ]  # fmt: skip
    assert body["next_cursor"] is None
    assert body["polls"][1]["options"][0]["label"] == "A"

    assert await _pages(edge, 2) == [
        ["expires later", "poll 4"], ["poll 3", "poll 2"], ["poll 1", "poll 0"],
    ]  # fmt: skip


async def test_a_poll_created_between_pages_shifts_nothing(edge: Client) -> None:
    for n in range(4):
        await create_poll(edge, question=f"poll {n}")
    page = await (await edge.get("/api/polls", params={"limit": "2"})).json()
    assert [p["question"] for p in page["polls"]] == ["poll 3", "poll 2"]
    await create_poll(edge, question="newer")
    after = await edge.get("/api/polls", params={"limit": "2", "cursor": page["next_cursor"]})
    body = await after.json()
    assert [p["question"] for p in body["polls"]] == ["poll 1", "poll 0"]
    assert body["next_cursor"] is None


async def test_polls_created_in_the_same_microsecond_are_each_listed_once(
    edge: Client, database_url: str
) -> None:
    # Ties on created_at are broken by id, so no poll is skipped or repeated.
    for n in range(5):
        await create_poll(edge, question=f"tied {n}")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE polls SET created_at = '2026-01-01T00:00:00Z'")
    finally:
        await conn.close()
    pages = await _pages(edge, 2)
    listed = [question for page in pages for question in page]
    assert sorted(listed) == [f"tied {n}" for n in range(5)]
    assert [len(page) for page in pages] == [2, 2, 1]


async def test_a_bad_limit_or_cursor_is_a_400_naming_it(edge: Client) -> None:
    for query, field in (
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "²"}, "limit"),  # a digit to str.isdigit, not to int()
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "bm90OmE6dXVpZA"}, "cursor"),  # base64 of "not:a:uuid"
        ({"cursor": "x" * 200}, "cursor"),
        ({"cursor": "é"}, "cursor"),
    ):
        response = await edge.get("/api/polls", params=query)
        assert response.status == 400, query
        assert (await response.json())["field"] == field


async def test_the_pages_are_served_with_their_types_and_a_strict_policy(edge: Client) -> None:
    poll = await create_poll(edge, question="Which one?")
    for path, kind in (
        ("/", "text/html"),
        (f"/polls/{poll['id']}", "text/html"),
        ("/static/voteflow.css", "text/css"),
        ("/static/poll.js", "text/javascript"),
        ("/static/list.js", "text/javascript"),
    ):
        response = await edge.get(path)
        assert response.status == 200, path
        assert response.content_type == kind, path
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        again = await edge.get(path, headers={"If-None-Match": response.headers["ETag"]})
        assert again.status == 304, path
    page = await (await edge.get(f"/polls/{poll['id']}")).text()
    assert '<script src="/static/poll.js" defer></script>' in page


async def test_no_such_poll_page_or_file_is_a_404(edge: Client) -> None:
    for path in (
        "/polls/5a2e7f5e-3c1b-4f0e-9a53-7b1d2c9e8f10",
        "/polls/not-a-uuid",
        "/static/nothing.css",
        "/static/poll.html",  # the pages have their own routes
        "/static/..%2Fapp.py",
    ):
        response = await edge.get(path)
        assert response.status == 404, path
        assert response.content_type == "text/html", path
