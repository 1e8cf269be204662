"""Slow or stuck clients cannot exhaust an edge.

Each test starts ``python -m voteflow edge`` as an OS process with short
limits (``VOTEFLOW_HEADER_TIMEOUT``, ``VOTEFLOW_BODY_TIMEOUT``,
``VOTEFLOW_MAX_CONNECTIONS``) and talks to it over raw TCP connections, so that
it can stall mid-head or mid-body and see exactly what the edge sends back and
when it closes. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.cluster import (
    REQUEST_TIMEOUT,
    STARTUP_TIMEOUT,
    Process,
    create_poll,
    start_voteflow,
    voteflow_env,
)
from tests.support import ADMIN
from voteflow.keys import Keys
from voteflow.servers import free_port
from voteflow.settings import Settings

SHARDS = 4
# Seconds a limit may be late: the edge's timers, the scheduler, a busy machine.
MARGIN = 2.0
HEALTH = b"GET /health HTTP/1.1\r\nHost: edge\r\n\r\n"

StartEdge = Callable[..., Awaitable[Process]]


@pytest.fixture
async def start_edge(settings: Settings, tmp_path: Path) -> AsyncIterator[StartEdge]:
    """Start an edge process with extra ``VOTEFLOW_*`` variables; each must stop
    on SIGTERM with status 0 at the end of the test."""
    started: list[Process] = []

    def spawn(**extra: str) -> Process:
        port = free_port()
        env = voteflow_env(settings, port, VOTEFLOW_STREAM_SHARDS=str(SHARDS), **extra)
        edge = start_voteflow(["edge"], env, tmp_path / f"edge-{len(started)}.log", port)
        started.append(edge)
        return edge

    async def start(**extra: str) -> Process:
        edge = spawn(**extra)
        await _until_healthy(edge)
        return edge

    yield start
    for edge in started:
        if edge.popen.poll() is None and await edge.terminate() is None:
            edge.popen.kill()
            edge.popen.wait(timeout=10)
            pytest.fail(f"the edge outlived SIGTERM\n{edge.log_tail()}")
        assert edge.popen.returncode == 0, edge.log_tail()


async def _until_healthy(edge: Process) -> None:
    # One connection per probe, closed after it: none is left open to count
    # against the edge's connection cap.
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if edge.popen.poll() is not None:
                pytest.fail(f"the edge exited at start-up\n{edge.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{edge.url}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    pytest.fail(f"the edge did not answer /health within {STARTUP_TIMEOUT:.0f}s")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Raw:
    """A client's TCP connection to an edge, written and read byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened_at = time.monotonic()

    @classmethod
    async def open(cls, edge: Process, source: str | None = None) -> Raw:
        """A connection from `source` (a loopback address like 127.0.0.2), or
        from wherever the kernel picks."""
        host, port = edge.url.removeprefix("http://").split(":")
        local = None if source is None else (source, 0)
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(host, int(port), local_addr=local)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, within: float) -> Answer | None:
        """The next response, or None if the edge closes the connection first."""
        async with asyncio.timeout(within):
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                assert exc.partial == b"", f"a partial answer: {exc.partial!r}"
                return None
            except ConnectionError:
                return None
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in filter(None, lines):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
            return Answer(int(status_line.split()[1]), headers, body)

    async def closed_at(self, within: float) -> tuple[float, bytes]:
        """When the edge closed the connection, and what it sent before."""
        received = b""
        async with asyncio.timeout(within):
            while True:
                try:
                    chunk = await self.reader.read(4096)
                except ConnectionError:  # reset, or our last write found it closed
                    chunk = b""
                if not chunk:
                    return time.monotonic(), received
                received += chunk

    def close(self) -> None:
        self.writer.close()


async def open_served(edge: Process, within: float = 5.0) -> Raw:
    """A keep-alive connection that got one /health answered and stays open.
    Tried again while the edge refuses it (a slot it freed a moment ago may not
    be free yet on its side)."""
    deadline = time.monotonic() + within
    while True:
        conn = await Raw.open(edge)
        with contextlib.suppress(ConnectionError):  # refused before the request went
            await conn.send(HEALTH)
        answer = await conn.answer(within)
        if answer is not None:
            assert answer.status == 200
            return conn
        conn.close()
        if time.monotonic() > deadline:
            pytest.fail(f"no connection was served within {within:.0f}s")
        await asyncio.sleep(0.05)


async def queued(redis: aioredis.Redis, key_prefix: str) -> int:
    keys = Keys(key_prefix, SHARDS)
    return sum([await redis.xlen(stream) for stream in keys.streams()])


async def test_silent_trickling_or_stalled_head_is_closed_after_header_timeout(
    start_edge: StartEdge,
) -> None:
    header_timeout = 1.0
    edge = await start_edge(VOTEFLOW_HEADER_TIMEOUT=str(header_timeout))
    silent = await Raw.open(edge)
    stalled = await Raw.open(edge)
    await stalled.send(b"POST /api/vote HTTP/1.1\r\nHost: edge\r\nContent-Ty")
    trickling = await Raw.open(edge)

    async def trickle() -> None:
        # A slowloris: a header line every 200 ms, the head never finished.
        with contextlib.suppress(ConnectionError):
            for n in range(10 * int(header_timeout + MARGIN)):
                await trickling.send(b"X-Slow-%d: 1\r\n" % n)
                await asyncio.sleep(0.2)

    sending = asyncio.create_task(trickle())
    # Meanwhile everyone else is served.
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        for _ in range(3):
            async with session.get(f"{edge.url}/health") as response:
                assert response.status == 200
    for conn in (silent, stalled, trickling):
        closed, received = await conn.closed_at(header_timeout + MARGIN)
        assert received == b"", "the edge answered a request it never fully received"
        assert closed - conn.opened_at >= header_timeout / 2  # the deadline, not at once
    await asyncio.wait_for(sending, MARGIN)


async def test_keep_alive_client_and_live_stream_outlast_header_and_body_timeouts(
    start_edge: StartEdge,
) -> None:
    timeout = 1.0
    edge = await start_edge(
        VOTEFLOW_HEADER_TIMEOUT=str(timeout),
        VOTEFLOW_BODY_TIMEOUT=str(timeout),
        VOTEFLOW_SSE_HEARTBEAT="0.3",
    )
    keep_alive = await Raw.open(edge)
    await keep_alive.send(HEALTH)
    first = await keep_alive.answer(MARGIN)
    assert first is not None and first.status == 200
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B"])
        async with session.get(f"{edge.url}/api/polls/{poll['id']}/live") as stream:
            assert stream.status == 200
            heartbeats = 0
            until = time.monotonic() + 3 * timeout
            while time.monotonic() < until:
                line = await asyncio.wait_for(stream.content.readline(), MARGIN)
                assert line, "the live stream ended"
                heartbeats += line.startswith(b": keep-alive")
            assert heartbeats >= 5
    # Idle for three header timeouts, the keep-alive connection still serves.
    await keep_alive.send(HEALTH)
    second = await keep_alive.answer(MARGIN)
    assert second is not None and second.status == 200
    keep_alive.close()


async def test_stalled_body_is_answered_408_after_body_timeout_and_appends_nothing(
    start_edge: StartEdge, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    body_timeout = 1.0
    edge = await start_edge(VOTEFLOW_BODY_TIMEOUT=str(body_timeout))
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B"])
    ballot = orjson.dumps(
        {"poll_id": poll["id"], "option_ids": [poll["options"][0]["id"]], "voter_fingerprint": "v"}
    )
    new_poll = orjson.dumps({"question": "Which one?", "options": ["A", "B"]})
    admin = f"Authorization: {ADMIN['Authorization']}\r\n"  # stall() sends the Content-Type

    async def stall(path: str, headers: str, body: bytes) -> tuple[float, Answer | None]:
        # Content-Length promises 100 bytes more than the half that is sent.
        conn = await Raw.open(edge)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            f"{headers}Content-Length: {len(body) // 2 + 100}\r\n\r\n"
        )
        await conn.send(head.encode() + body[: len(body) // 2])
        sent = time.monotonic()
        answer = await conn.answer(body_timeout + MARGIN)
        conn.close()
        return time.monotonic() - sent, answer

    stalls = await asyncio.gather(
        stall("/api/vote", "", ballot), stall("/api/polls", admin, new_poll)
    )
    for waited, answer in stalls:
        assert answer is not None and answer.status == 408, answer
        assert answer.json()["error"]
        assert waited >= body_timeout / 2
    assert await queued(redis_client, key_prefix) == 0
    # The same ballot, sent whole, is queued: the stream was the right place to look.
    conn = await Raw.open(edge)
    await conn.send(
        b"POST /api/vote HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(ballot), ballot)
    )
    answer = await conn.answer(MARGIN)
    assert answer is not None and answer.status == 202, answer
    conn.close()
    assert await queued(redis_client, key_prefix) == 1


async def test_connections_beyond_max_connections_are_closed_until_a_slot_frees(
    start_edge: StartEdge,
) -> None:
    cap = 20
    edge = await start_edge(VOTEFLOW_MAX_CONNECTIONS=str(cap))
    held = [await open_served(edge) for _ in range(cap)]

    async def refused() -> bool:
        extra = await Raw.open(edge)
        with contextlib.suppress(ConnectionError):  # refused before the request went
            await extra.send(HEALTH)
        answer = await extra.answer(MARGIN)
        extra.close()
        return answer is None

    try:
        assert await refused(), "a connection over the cap was served"
        # Idle clients leave: as many new ones are served, and not one more.
        for conn in held[:5]:
            conn.close()
        held[:5] = [await open_served(edge) for _ in range(5)]
        assert await refused(), "a connection over the cap was served"
    finally:
        for conn in held:
            conn.close()
    # Once under the cap, everyone is served again.
    (await open_served(edge)).close()
    async with (
        aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session,
        session.get(f"{edge.url}/health") as response,
    ):
        assert response.status == 200


@pytest.mark.parametrize("length", [4097, 10**9])
async def test_vote_body_over_4_kib_is_refused_413_before_it_is_sent(
    start_edge: StartEdge, length: int
) -> None:
    edge = await start_edge()
    conn = await Raw.open(edge)
    await conn.send(
        b"POST /api/vote HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )
    # Well before the body deadline (10 s): the length alone is refused.
    answer = await conn.answer(MARGIN)
    conn.close()
    assert answer is not None and answer.status == 413, answer
    assert "4096" in answer.json()["error"]


async def open_stuck_stream(edge: Process, poll_id: str, source: str = "127.0.0.1") -> Raw:
    """A live stream that got its answer's head and then never reads again."""
    conn = await Raw.open(edge, source)
    await conn.send(f"GET /api/polls/{poll_id}/live HTTP/1.1\r\nHost: edge\r\n\r\n".encode())
    async with asyncio.timeout(MARGIN):
        head = await conn.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return conn


async def refused_stream(edge: Process, poll_id: str, source: str, ws: bool = False) -> Answer:
    conn = await Raw.open(edge, source)
    path = f"/api/polls/{poll_id}/{'ws' if ws else 'live'}"
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        if ws
        else ""
    )
    await conn.send(f"GET {path} HTTP/1.1\r\nHost: edge\r\n{upgrade}\r\n".encode())
    answer = await conn.answer(MARGIN)
    conn.close()
    assert answer is not None
    return answer


async def test_live_streams_beyond_the_per_address_limit_are_429_and_other_addresses_still_stream(
    start_edge: StartEdge,
) -> None:
    per_address = 3
    # An SSE client's leaving shows at the edge's next write to it: a heartbeat.
    edge = await start_edge(
        VOTEFLOW_LIVE_MAX_PER_ADDRESS=str(per_address), VOTEFLOW_SSE_HEARTBEAT="0.3"
    )
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B"])
    held = [await open_stuck_stream(edge, poll["id"]) for _ in range(per_address)]
    try:
        for ws in (False, True):  # SSE and WebSocket share the count
            answer = await refused_stream(edge, poll["id"], "127.0.0.1", ws)
            assert answer.status == 429, answer
            assert int(answer.headers["retry-after"]) >= 1
            assert f"at most {per_address} live streams" in answer.json()["error"]
        # Another address is not held back by this one.
        other = await open_stuck_stream(edge, poll["id"], source="127.0.0.2")
        other.close()
        # One stream of the first address ends: it may open one more.
        held.pop().close()
        deadline = time.monotonic() + 2 * MARGIN
        while True:
            conn = await Raw.open(edge)
            await conn.send(
                f"GET /api/polls/{poll['id']}/live HTTP/1.1\r\nHost: e\r\n\r\n".encode()
            )
            head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), MARGIN)
            if head.startswith(b"HTTP/1.1 200"):
                held.append(conn)
                break
            conn.close()
            assert time.monotonic() < deadline, head
            await asyncio.sleep(0.2)
    finally:
        for conn in held:
            conn.close()


async def test_with_the_live_budget_full_a_vote_is_202_and_a_new_stream_503(
    start_edge: StartEdge, redis_client: aioredis.Redis, key_prefix: str
) -> None:
    edge = await start_edge(
        VOTEFLOW_MAX_CONNECTIONS="8",
        VOTEFLOW_LIVE_MAX_CONNECTIONS="4",
        VOTEFLOW_LIVE_MAX_PER_ADDRESS="100",
    )
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B"])
    # Watchers that never read hold every slot live streams may take...
    held = [await open_stuck_stream(edge, poll["id"]) for _ in range(4)]
    try:
        answer = await refused_stream(edge, poll["id"], "127.0.0.2")
        assert answer.status == 503, answer
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["error"]
        # ...and a voter is still served.
        ballot = orjson.dumps(
            {
                "poll_id": poll["id"],
                "option_ids": [poll["options"][0]["id"]],
                "voter_fingerprint": "v",
            }
        )
        conn = await Raw.open(edge)
        await conn.send(
            b"POST /api/vote HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(ballot), ballot)
        )
        voted = await conn.answer(MARGIN)
        conn.close()
        assert voted is not None and voted.status == 202, voted
        assert await queued(redis_client, key_prefix) == 1
    finally:
        for stuck in held:
            stuck.close()
