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

import aiohttp
import orjson
import uvloop

# Streams opened at once: a burst of 10,000 connects would overflow the
# edge's listen backlog for nothing.
CONNECT_BATCH = 250
CONNECT_TIMEOUT = 120.0


async def _watch(
    session: aiohttp.ClientSession,
    url: str,
    first: asyncio.Event,
    delays: list[float],
    as_of: dict[bytes, float],
    connected: list[int],
) -> None:
    async with session.get(url) as response:
        response.raise_for_status()
        connected[0] += 1
        async for raw in response.content:
            if not raw.startswith(b"data: "):
                continue
            arrived = time.time()
            if not first.is_set():
                first.set()
                continue  # the snapshot sent on connect: no commit just happened
            # Every stream gets the same bytes per update: parse them once.
            when = as_of.get(raw)
            if when is None:
                when = as_of[raw] = datetime.fromisoformat(
                    orjson.loads(raw[6:])["as_of"]
                ).timestamp()
            delays.append(arrived - when)


def _percentile(ordered: list[float], p: int) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))]


async def main(url: str, poll_id: str, count: int) -> None:
    stream = f"{url}/api/polls/{poll_id}/live"
    delays: list[float] = []
    as_of: dict[bytes, float] = {}
    connected = [0]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks: list[asyncio.Task[None]] = []
        async with asyncio.timeout(CONNECT_TIMEOUT):
            for start in range(0, count, CONNECT_BATCH):
                batch = [asyncio.Event() for _ in range(min(CONNECT_BATCH, count - start))]
                tasks += [
                    asyncio.create_task(_watch(session, stream, e, delays, as_of, connected))
                    for e in batch
                ]
                await asyncio.gather(*(e.wait() for e in batch))
        print(f"CONNECTED {connected[0]}", flush=True)
        started = time.monotonic()
        # Until the bench closes our stdin.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        seconds = time.monotonic() - started
        still_open = sum(1 for task in tasks if not task.done())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    delays.sort()
    print(
        orjson.dumps(
            {
                "watchers": count,
                "still_open": still_open,
                "updates": len(delays),
                "seconds": seconds,
                "versions": len(as_of),
                "delay_ms": {f"p{p}": 1000 * _percentile(delays, p) for p in (50, 95, 99)},
            }
        ).decode(),
        flush=True,
    )


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
