"""Many dashboards at once, for the bench's fan-out stage: N SSE streams of one
poll held open from this one process, each update's delay noted.

    python -m loadtest.bench.watchers URL POLL_ID N

It prints ``CONNECTED <n>`` once every stream has sent its first tally, then
reads until its stdin closes, and prints one line of JSON: the streams still
open, the updates received, and the delay of each update from the commit it
reports (the tally's ``as_of``, set by the worker after its commit) to its
arrival here, as percentiles. One clock: this machine's.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime
from typing import cast
from urllib.parse import urlsplit

import orjson
import uvloop

# Streams opened at once: a burst of 10,000 connects would overflow the
# edge's listen backlog for nothing.
CONNECT_BATCH = 250
CONNECT_TIMEOUT = 120.0


class _Shared:
    """What every stream of the process adds to: one record for all."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.as_of: dict[bytes, float] = {}  # each update's commit time, parsed once
        self.open = 0


class _Watcher(asyncio.Protocol):
    """One SSE stream, read as raw bytes: a dashboard costs this process a
    few byte searches per update, not an HTTP client's coroutine, so that
    10,000 of them measure the edge rather than themselves."""

    def __init__(self, request: bytes, shared: _Shared) -> None:
        self._request = request
        self._shared = shared
        self._buffer = b""
        self.first = asyncio.Event()  # the snapshot sent on connect arrived
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        cast(asyncio.Transport, transport).write(self._request)
        self._shared.open += 1

    def data_received(self, data: bytes) -> None:
        arrived = time.time()
        buffer = self._buffer + data
        while True:
            # An event is one "data: " line; the head and the chunk framing
            # around it never hold one.
            start = buffer.find(b"data: ")
            end = buffer.find(b"\n", start) if start >= 0 else -1
            if end < 0:
                break
            self._seen(buffer[start:end], arrived)
            buffer = buffer[end + 1 :]
        self._buffer = buffer[-5:] if start < 0 else buffer

    def _seen(self, line: bytes, arrived: float) -> None:
        if not self.first.is_set():
            self.first.set()  # the snapshot sent on connect: no commit just happened
            return
        when = self._shared.as_of.get(line)
        if when is None:  # every stream gets the same bytes per update
            when = self._shared.as_of[line] = datetime.fromisoformat(
                orjson.loads(line[6:])["as_of"]
            ).timestamp()
        self._shared.delays.append(arrived - when)

    def connection_lost(self, exc: Exception | None) -> None:
        self._shared.open -= 1
        self.closed.set()
        self.first.set()  # never wait for a stream that is gone


async def _open(host: str, port: int, request: bytes, shared: _Shared) -> _Watcher:
    loop = asyncio.get_running_loop()
    _, watcher = await loop.create_connection(lambda: _Watcher(request, shared), host, port)
    await watcher.first.wait()
    return watcher


def percentiles(values: list[float], points: tuple[int, ...] = (50, 95, 99)) -> list[float]:
    """Nearest-rank percentiles of `values` (NaN for none): each one a value
    observed, where statistics.quantiles would interpolate between two."""
    if not values:
        return [float("nan")] * len(points)
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))] for p in points]


async def main(url: str, poll_id: str, count: int) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"GET /api/polls/{poll_id}/live HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    shared = _Shared()
    watchers: list[_Watcher] = []
    async with asyncio.timeout(CONNECT_TIMEOUT):
        for start in range(0, count, CONNECT_BATCH):
            size = min(CONNECT_BATCH, count - start)
            watchers += await asyncio.gather(
                *(_open(host, port, request, shared) for _ in range(size))
            )
    print(f"CONNECTED {shared.open}", flush=True)
    started = time.monotonic()
    # Until the bench closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    seconds = time.monotonic() - started
    still_open = shared.open
    delays = shared.delays
    print(
        orjson.dumps(
            {
                "watchers": count,
                "still_open": still_open,
                "updates": len(delays),
                "seconds": seconds,
                "versions": len(shared.as_of),
                "delay_ms": {
                    f"p{p}": 1000 * value
                    for p, value in zip((50, 95, 99), percentiles(delays), strict=True)
                },
            }
        ).decode(),
        flush=True,
    )


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
