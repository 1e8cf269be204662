"""Live tallies over Server-Sent Events: a snapshot at once, then every change."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import uuid
import weakref
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType
from aiohttp.test_utils import TestClient
from redis import asyncio as aioredis

from ingest.live import LIFETIME_JITTER
from ingest.longlived import LongLived
from tests.support import InProcessWorker, create_poll, edge_client, next_event, results
from voteflow.keys import Keys
from voteflow.settings import Settings
from voteflow.tally import Tally
from voteflow.timeutil import now_us

Client = TestClient[Any, Any]


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


async def test_websocket_sends_the_same_tally_messages(
    edge: Client, worker: InProcessWorker
) -> None:
    poll = await create_poll(edge)
    a = poll["options"][0]["id"]
    async with (
        edge.get(f"/api/polls/{poll['id']}/live") as sse,
        edge.ws_connect(f"/api/polls/{poll['id']}/ws") as ws,
    ):
        first = orjson.loads((await ws.receive(timeout=10)).data)
        assert first == await next_event(sse)
        assert first["total_ballots"] == 0
        body = {"poll_id": poll["id"], "option_ids": [a], "voter_fingerprint": "v"}
        assert (await edge.post("/api/vote", json=body)).status == 202
        update = orjson.loads((await ws.receive(timeout=10)).data)
        assert update == await next_event(sse)
        assert {o["id"]: o["votes"] for o in update["options"]}[a] == 1


async def test_websocket_of_unknown_poll_is_404(edge: Client) -> None:
    response = await edge.get(f"/api/polls/{uuid.uuid4()}/ws")
    assert response.status == 404


async def _publish_versions(
    redis: aioredis.Redis, settings: Settings, poll: dict[str, Any], versions: range
) -> None:
    """Tallies of `poll` as a worker would publish them, one per version."""
    keys = Keys(settings.key_prefix, settings.stream_shards)
    option = poll["options"][0]["id"]
    for version in versions:
        tally = Tally(poll["id"], version, version, {option: version}, now_us())
        await redis.publish(keys.tally_channel(poll["id"]), tally.encode())
        await asyncio.sleep(0.005)


async def test_a_watcher_gets_at_most_the_set_rate_and_ends_on_the_latest(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    slow = dataclasses.replace(settings, live_updates_per_second=2.0)
    async with edge_client(slow) as edge:
        poll = await create_poll(edge)
        async with (
            edge.get(f"/api/polls/{poll['id']}/live") as sse,
            edge.ws_connect(f"/api/polls/{poll['id']}/ws") as ws,
        ):
            await next_event(sse)  # the snapshot: subscribed
            await ws.receive(timeout=10)
            started = asyncio.get_running_loop().time()
            await _publish_versions(redis_client, slow, poll, range(1, 101))
            seen: list[int] = []
            ws_seen: list[int] = []
            while not seen or seen[-1] < 100:
                seen.append((await next_event(sse))["version"])
            while not ws_seen or ws_seen[-1] < 100:
                ws_seen.append(orjson.loads((await ws.receive(timeout=10)).data)["version"])
            elapsed = asyncio.get_running_loop().time() - started
    # 100 tallies over about a second, at most 2 updates a second each: a few
    # updates, the last the latest, in order.
    for got in (seen, ws_seen):
        assert got == sorted(got) and got[-1] == 100
        assert len(got) <= 2 * elapsed + 2, (got, elapsed)


async def test_a_watcher_that_stops_reading_is_dropped_not_buffered_for(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    hasty = dataclasses.replace(settings, live_updates_per_second=1000.0, live_write_timeout=1.0)
    async with edge_client(hasty) as edge:
        # Big events (64 long labels, about 14 KB each) fill socket buffers fast.
        poll = await create_poll(edge, options=[f"{n:03d} " + "x" * 196 for n in range(64)])
        # A client that asks for the stream and never reads a byte of it.
        _, stuck = await asyncio.open_connection(edge.host, edge.port)
        stuck.write(f"GET /api/polls/{poll['id']}/live HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await stuck.drain()
        async with edge.get(f"/api/polls/{poll['id']}/live") as reading:
            versions = [(await next_event(reading))["version"]]

            async def keep_reading() -> None:
                while True:
                    versions.append((await next_event(reading))["version"])

            async def dropped() -> float:
                text = await (await edge.get("/metrics")).text()
                (line,) = [
                    x for x in text.splitlines() if x.startswith("voteflow_live_dropped_total")
                ]
                return float(line.split()[1])

            reader = asyncio.create_task(keep_reading())
            version = 0
            async with asyncio.timeout(60):
                while await dropped() == 0:
                    await _publish_versions(
                        redis_client, hasty, poll, range(version + 1, version + 51)
                    )
                    version += 50
                # The watcher that reads is still served, up to the latest tally.
                while versions[-1] < version:
                    assert not reader.done(), reader
                    await asyncio.sleep(0.05)
            reader.cancel()
            text = await (await edge.get("/metrics")).text()
            assert "voteflow_live_subscribers 1.0" in text
            assert await dropped() == 1
        stuck.close()


async def test_a_live_stream_ends_after_its_max_lifetime_and_a_reconnect_gets_the_latest_tally(
    settings: Settings, worker: InProcessWorker
) -> None:
    lifetime = 1.0
    short = dataclasses.replace(settings, live_max_seconds=lifetime)
    async with edge_client(short) as edge:
        poll = await create_poll(edge)
        a = poll["options"][0]["id"]
        body = {"poll_id": poll["id"], "option_ids": [a], "voter_fingerprint": "v"}
        started = asyncio.get_running_loop().time()
        async with (
            edge.get(f"/api/polls/{poll['id']}/live") as sse,
            edge.ws_connect(f"/api/polls/{poll['id']}/ws") as ws,
        ):
            assert (await next_event(sse))["total_ballots"] == 0
            await ws.receive(timeout=10)
            async with asyncio.timeout(lifetime + 5):
                while await sse.content.readline():  # to the stream's end
                    pass
                while (message := await ws.receive()).type != WSMsgType.CLOSE:
                    pass
            ended = asyncio.get_running_loop().time() - started
            assert message.data == WSCloseCode.OK
        assert (1 - LIFETIME_JITTER) * lifetime - 0.1 <= ended <= lifetime + 2, ended
        # A ballot counted while the watcher was away is in the first event of
        # its next stream.
        assert (await edge.post("/api/vote", json=body)).status == 202
        async with asyncio.timeout(10):
            while (await results(edge, poll["id"]))["total_ballots"] < 1:
                await asyncio.sleep(0.05)
        async with edge.get(f"/api/polls/{poll['id']}/live") as again:
            latest = await next_event(again)
            assert latest["total_ballots"] == 1
            assert {o["id"]: o["votes"] for o in latest["options"]}[a] == 1


async def test_an_ipv6_64_counts_as_one_address_for_live_streams(settings: Settings) -> None:
    behind_proxy = dataclasses.replace(
        settings, live_max_per_address=2, trusted_proxies="127.0.0.1"
    )
    async with edge_client(behind_proxy) as edge, contextlib.AsyncExitStack() as streams:
        poll = await create_poll(edge)
        path = f"/api/polls/{poll['id']}/live"
        for client in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::7"):
            held = await streams.enter_async_context(
                edge.get(path, headers={"X-Forwarded-For": client})
            )
            assert held.status == 200
        refused = await edge.get(path, headers={"X-Forwarded-For": "2001:db8:1:2::99"})
        assert refused.status == 429
        assert refused.headers["Retry-After"]
        assert set(await refused.json()) == {"error"}
        # The next /64 is another client.
        other = await edge.get(path, headers={"X-Forwarded-For": "2001:db8:1:3::1"})
        assert other.status == 200
        other.close()


class _Cycle:
    """Garbage only the cyclic collector can free: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


def test_streams_objects_are_frozen_while_many_are_open_and_given_back_when_they_leave() -> None:
    keeper = LongLived(every=3)
    gc.collect()
    gc.unfreeze()
    try:
        died = _Cycle()
        gone = weakref.ref(died)
        for open_now in (1, 2, 3):
            keeper.opened(open_now)
        # The third stream froze everything alive: full collections skip it...
        assert gc.get_freeze_count() > 0
        del died
        gc.collect()
        assert gone() is not None
        keeper.closed(2)
        keeper.closed(1)
        assert gc.get_freeze_count() > 0
        # ...until the streams open fall under half of those open then: what
        # died in a cycle meanwhile goes back to the collector and is freed.
        keeper.closed(0)
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()


def test_frozen_streams_are_given_back_once_the_audience_has_turned_over() -> None:
    # Watchers reconnect (each stream has a lifetime) and the count open stays
    # high: what their old streams left in cycles must not stay frozen.
    keeper = LongLived(every=4)
    gc.unfreeze()
    try:
        for open_now in (1, 2, 3, 4):
            keeper.opened(open_now)
        assert gc.get_freeze_count() > 0
        for _ in range(3):  # one closes, one comes back: 4 open throughout
            keeper.closed(3)
            keeper.opened(4)
        assert gc.get_freeze_count() > 0
        keeper.closed(3)  # the fourth close since the freeze: all four turned over
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
