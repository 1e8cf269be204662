"""Live tallies over Server-Sent Events: a snapshot at once, then every change."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from tests.support import InProcessWorker, create_poll

Client = TestClient[Any, Any]


async def next_event(response: ClientResponse, timeout: float = 10.0) -> dict[str, Any]:
    """The next `tally` event of an SSE stream (heartbeat comments skipped)."""
    event: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        while True:
            line = (await response.content.readline()).decode().rstrip("\n")
            if line == "":
                if "data" in event:
                    assert event["event"] == "tally"
                    data: dict[str, Any] = orjson.loads(event["data"])
                    assert int(event["id"]) == data["version"]
                    return data
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            event[name] = value


async def test_live_stream_sends_current_tally_then_each_change(
    edge: Client, worker: InProcessWorker
) -> None:
    poll = await create_poll(edge)
    a, b = poll["options"][0]["id"], poll["options"][1]["id"]
    async with edge.get(f"/api/polls/{poll['id']}/live") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = await next_event(response)
        assert first["poll_id"] == poll["id"]
        assert [o["votes"] for o in first["options"]] == [0, 0, 0]
        body = {"poll_id": poll["id"], "option_ids": [a], "voter_fingerprint": "v"}
        assert (await edge.post("/api/vote", json=body)).status == 202
        update = await next_event(response)
        assert update["version"] > first["version"]
        assert {o["id"]: o["votes"] for o in update["options"]}[a] == 1
        body["option_ids"] = [b]
        assert (await edge.post("/api/vote", json=body)).status == 202
        latest = await next_event(response)
        assert {o["id"]: o["votes"] for o in latest["options"]} == {
            a: 0,
            b: 1,
            poll["options"][2]["id"]: 0,
        }
        assert latest["total_ballots"] == 1


async def test_a_late_watcher_gets_the_current_tally_at_once(
    edge: Client, worker: InProcessWorker
) -> None:
    poll = await create_poll(edge)
    a = poll["options"][0]["id"]
    async with edge.get(f"/api/polls/{poll['id']}/live") as watcher:
        await next_event(watcher)
        body = {"poll_id": poll["id"], "option_ids": [a], "voter_fingerprint": "v"}
        assert (await edge.post("/api/vote", json=body)).status == 202
        await next_event(watcher)
    async with edge.get(f"/api/polls/{poll['id']}/live") as late:
        snapshot = await next_event(late)
        assert {o["id"]: o["votes"] for o in snapshot["options"]}[a] == 1


async def test_live_stream_of_unknown_poll_is_404(edge: Client) -> None:
    response = await edge.get(f"/api/polls/{uuid.uuid4()}/live")
    assert response.status == 404
