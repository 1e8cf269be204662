"""A quick burst against a running voteflow: N votes on one poll, as fast as it goes.

    python -m loadtest.burst --url http://127.0.0.1:8080 --admin-token TOKEN --votes 20000

Creates a poll, sends the votes from --concurrency connections (distinct
voters, a tenth of them voting twice), then waits until the poll's results
count every accepted ballot. Prints the edge's acceptance rate and the end to
end rate (first request to last commit). Bounded: --votes requests at most,
--timeout seconds at most. For the full picture use `make bench` and Locust.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections import Counter

import aiohttp


async def _run(args: argparse.Namespace) -> int:
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(args.url, connector=connector, timeout=timeout) as http:
        poll_body = {"question": "Burst?", "options": ["A", "B", "C", "D"]}
        headers = {"Authorization": f"Bearer {args.admin_token}"}
        async with http.post("/api/polls", json=poll_body, headers=headers) as response:
            if response.status != 201:
                print(f"could not create a poll: {response.status} {await response.text()}")
                return 1
            poll = await response.json()
        options = [o["id"] for o in poll["options"]]
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        voters = max(1, int(args.votes / 1.1))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(args.votes):
            queue.put_nowait(n)

        async def client() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                body = {
                    "poll_id": poll["id"],
                    "option_ids": [options[n % len(options)]],
                    "voter_fingerprint": f"burst-{n % voters}",
                    "vote_id": str(uuid.uuid4()),
                }
                started = time.perf_counter()
                try:
                    async with http.post("/api/vote", json=body) as response:
                        await response.read()
                        statuses[response.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    statuses[0] += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(client() for _ in range(args.concurrency))), args.timeout
        )
        sent = time.perf_counter() - started
        accepted_voters = min(voters, statuses[202])
        deadline = time.monotonic() + args.timeout
        total = -1
        while time.monotonic() < deadline:
            async with http.get(f"/api/polls/{poll['id']}/results") as response:
                total = (await response.json())["total_ballots"]
            if total >= accepted_voters:
                break
            await asyncio.sleep(0.05)
        done = time.perf_counter() - started
    latencies.sort()
    print(f"statuses: {dict(sorted(statuses.items()))}")
    print(f"edge:       {statuses[202] / sent:,.0f} votes/s accepted ({sent:.2f}s)")
    print(
        f"latency:    p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"p95 {latencies[int(len(latencies) * 0.95)] * 1000:.1f} ms"
    )
    print(f"end to end: {statuses[202] / done:,.0f} votes/s committed ({done:.2f}s)")
    print(f"ballots counted: {total} of {accepted_voters} voters")
    return 0 if total == accepted_voters else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--admin-token", required=True)
    parser.add_argument("--votes", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0)
    return asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
