"""voteflow as it runs in production: edges and workers as separate OS processes.

Each test starts ``python -m voteflow edge`` and ``python -m voteflow worker``
processes against its own database and key prefix, talks to the edges over
HTTP, signals the processes the way a supervisor would, and checks the tallies
against the rules and against a recount of the votes table.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.support import ADMIN, drain, recount, votes_by_option
from voteflow.keys import GROUP, Keys
from voteflow.servers import free_port
from voteflow.settings import Settings

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 30.0
# A worker gives its consumers 20 s (SHUTDOWN_GRACE) to finish their batches,
# an edge its requests 10 s (shutdown_timeout); both should need far less.
STOP_TIMEOUT = 25.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=20)


@dataclass
class Process:
    role: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""  # an edge's base URL

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of the {self.role} (pid {self.pid}) log ---\n{tail}"

    async def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the process still runs after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.popen.returncode

    async def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM; the exit status, or None if it still runs after `timeout`."""
        self.popen.send_signal(signal.SIGTERM)
        return await self.wait(timeout)


class Cluster:
    """The edge and worker processes of one test, and the means to watch them."""

    def __init__(self, settings: Settings, log_dir: Path, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.stream_shards)
        self.log_dir = log_dir
        self.redis = redis
        self.processes: list[Process] = []

    def _spawn(self, role: str) -> Process:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEFLOW_")}
        env.update(
            VOTEFLOW_DATABASE_URL=self.settings.database_url,
            VOTEFLOW_REDIS_URL=self.settings.redis_url,
            VOTEFLOW_KEY_PREFIX=self.settings.key_prefix,
            VOTEFLOW_ADMIN_TOKEN="test-admin-token",
            VOTEFLOW_PORT=str(port),
            VOTEFLOW_WORKER_METRICS_PORT="0",
            VOTEFLOW_RATE_LIMIT_PER_IP="0",
            VOTEFLOW_RATE_LIMIT_PER_VOTER="0",
            VOTEFLOW_STREAM_SHARDS=str(self.settings.stream_shards),
        )
        log_path = self.log_dir / f"{role}-{len(self.processes)}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "voteflow", role],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}" if role == "edge" else ""
        process = Process(role, popen, log_path, url)
        self.processes.append(process)
        return process

    async def start(self, edges: int = 0, workers: int = 0) -> tuple[list[Process], list[Process]]:
        """Start processes side by side; return once every edge answers /health
        and every worker reads every stream shard."""
        started_edges = [self._spawn("edge") for _ in range(edges)]
        started_workers = [self._spawn("worker") for _ in range(workers)]
        async with asyncio.timeout(STARTUP_TIMEOUT):
            await asyncio.gather(
                *(self._until_healthy(edge) for edge in started_edges),
                *(self._until_consuming(worker) for worker in started_workers),
            )
        return started_edges, started_workers

    async def _until_healthy(self, edge: Process) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                self._check_alive(edge)
                try:
                    async with session.get(f"{edge.url}/health") as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)

    async def _until_consuming(self, worker: Process) -> None:
        while True:
            self._check_alive(worker)
            if all(await self.consumers_of(worker)):
                return
            await asyncio.sleep(0.1)

    async def consumers_of(self, worker: Process) -> list[dict[str, Any] | None]:
        """Per stream shard, the worker's consumer as XINFO CONSUMERS shows it
        (None until it has read that shard once). Names hold the pid."""
        found: list[dict[str, Any] | None] = []
        for stream in self.keys.streams():
            try:
                consumers = await self.redis.xinfo_consumers(stream, GROUP)
            except aioredis.ResponseError:  # no stream or no group yet
                consumers = []
            mine = [c for c in consumers if f":{worker.pid}:" in _text(c["name"])]
            found.append(mine[0] if mine else None)
        return found

    @staticmethod
    def _check_alive(process: Process) -> None:
        if process.popen.poll() is not None:
            pytest.fail(
                f"the {process.role} exited with status {process.popen.returncode} "
                f"at start-up\n{process.log_tail()}"
            )

    async def close(self) -> list[str]:
        """SIGTERM what still runs, SIGKILL what outlives STOP_TIMEOUT; report
        every process that did not end on its own with status 0."""
        running = [p for p in self.processes if p.popen.poll() is None]
        for process in running:
            process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        problems = []
        for process in running:
            if await process.wait(max(deadline - time.monotonic(), 0.0)) is None:
                process.popen.kill()
                process.popen.wait(timeout=10)
                problems.append(
                    f"the {process.role} outlived SIGTERM; killed\n{process.log_tail()}"
                )
        for process in self.processes:
            assert process.popen.returncode is not None, f"{process.role} {process.pid} still runs"
            if process.popen.returncode not in (0, -signal.SIGKILL):
                problems.append(
                    f"the {process.role} exited with status {process.popen.returncode}\n"
                    f"{process.log_tail()}"
                )
        return problems


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def cluster(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> AsyncIterator[Cluster]:
    """Edge and worker processes on this test's database and key prefix; each
    is stopped at the end and must have exited with status 0."""
    running = Cluster(settings, tmp_path, redis)
    try:
        yield running
    finally:
        problems = await running.close()
    assert not problems, "\n".join(problems)


# -- talking to the edges ---------------------------------------------------


async def create_poll(
    session: aiohttp.ClientSession, edge: Process, labels: list[str], **fields: Any
) -> dict[str, Any]:
    body = {"question": "Which one?", "options": labels, **fields}
    async with session.post(f"{edge.url}/api/polls", json=body, headers=ADMIN) as response:
        assert response.status == 201, await response.text()
        poll: dict[str, Any] = await response.json()
        return poll


async def post_vote(session: aiohttp.ClientSession, edge: Process, body: dict[str, Any]) -> str:
    """Send one ballot; it must be accepted. Returns its vote_id."""
    async with session.post(f"{edge.url}/api/vote", json=body) as response:
        assert response.status == 202, f"{response.status}: {await response.text()}"
        vote_id: str = (await response.json())["vote_id"]
        return vote_id


async def get_results(
    session: aiohttp.ClientSession, edge: Process, poll_id: str
) -> dict[str, Any]:
    async with session.get(f"{edge.url}/api/polls/{poll_id}/results") as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def stored_vote_ids(database_url: str, poll_id: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT vote_id FROM votes WHERE poll_id = $1", poll_id)
    finally:
        await conn.close()
    return [str(row["vote_id"]) for row in rows]


async def count_votes(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM votes")
    finally:
        await conn.close()
    return n


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while True:
                met = condition()
                if not isinstance(met, bool):
                    met = await met
                if met:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"not within {timeout:.0f}s: {what}")


def option_ids_of(poll: dict[str, Any]) -> list[str]:
    return [option["id"] for option in poll["options"]]


def tally_of(ballots: Iterable[Iterable[str]], options: Iterable[str]) -> dict[str, int]:
    counts = Counter(option for ballot in ballots for option in ballot)
    return {option: counts[option] for option in options}


# -- many voters at once ------------------------------------------------------


@dataclass
class Ledger:
    """What the voters were told, from which the tallies follow by the rules."""

    # poll id -> every vote_id answered 202
    accepted: dict[str, set[str]] = field(default_factory=dict)
    # single-vote polls: (poll id, voter) -> options of the voter's last new ballot
    latest: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    # multiple-vote polls: vote_id -> options (a retried vote_id is one entry)
    ballots: dict[str, tuple[str, ...]] = field(default_factory=dict)


async def test_several_edges_and_workers_count_thousands_of_concurrent_votes_exactly(
    cluster: Cluster, settings: Settings, redis: aioredis.Redis
) -> None:
    edges, _ = await cluster.start(edges=2, workers=2)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        polls = [
            await create_poll(session, edges[0], ["A", "B", "C", "D"]),
            await create_poll(
                session, edges[1], ["A", "B", "C"], allow_multiple_votes=True, max_choices=2
            ),
            await create_poll(session, edges[0], ["X", "Y", "Z"]),
        ]
        ledger = Ledger(accepted={poll["id"]: set() for poll in polls})
        requests = 0

        async def send(body: dict[str, Any]) -> str:
            nonlocal requests
            requests += 1
            return await post_vote(session, edges[requests % len(edges)], body)

        async def voter(n: int) -> None:
            rng = random.Random(n)
            # Every fourth voter is a signed-in user on a new device each time:
            # the user_id, not the fingerprint, is the voter.
            signed_in = n % 4 == 0
            voter = f"user-{n}" if signed_in else f"fp-{n}"
            retriable: list[dict[str, Any]] = []
            for step in range(rng.randint(3, 5)):
                poll = rng.choices(polls, weights=(4, 4, 2))[0]
                chosen = rng.sample(option_ids_of(poll), rng.randint(1, poll["max_choices"]))
                body: dict[str, Any] = {"poll_id": poll["id"], "option_ids": chosen}
                if signed_in:
                    body |= {"user_id": voter, "voter_fingerprint": f"device-{n}-{step}"}
                else:
                    body["voter_fingerprint"] = voter
                if rng.random() < 0.8:  # the client chose the vote_id, so it may retry
                    body["vote_id"] = str(uuid.uuid4())
                # A client that timed out sends the same ballot again while
                # the first is still in flight, to another edge.
                copies = rng.choice((2, 3)) if "vote_id" in body and rng.random() < 0.2 else 1
                answers = await asyncio.gather(*(send(body) for _ in range(copies)))
                assert len(set(answers)) == 1, answers
                vote_id = answers[0]
                ledger.accepted[poll["id"]].add(vote_id)
                if poll["allow_multiple_votes"]:
                    ledger.ballots[vote_id] = tuple(chosen)
                else:
                    ledger.latest[(poll["id"], voter)] = tuple(chosen)
                if retriable and rng.random() < 0.3:
                    # A late retry of an earlier ballot, after a later one.
                    earlier = rng.choice(retriable)
                    assert await send(earlier) == earlier["vote_id"]
                if "vote_id" in body:
                    retriable.append(body)

        async with asyncio.timeout(60):
            await asyncio.gather(*(voter(n) for n in range(500)))
        await drain(redis, settings, timeout=60)

        assert requests >= 2000, requests
        for poll in polls:
            options = option_ids_of(poll)
            if poll["allow_multiple_votes"]:
                ballots = [ledger.ballots[v] for v in ledger.accepted[poll["id"]]]
            else:
                ballots = [b for (p, _), b in ledger.latest.items() if p == poll["id"]]
            expected = tally_of(ballots, options)
            for edge in edges:
                result = await get_results(session, edge, poll["id"])
                assert votes_by_option(result) == expected
                assert result["total_ballots"] == len(ballots)
            assert await recount(settings.database_url, poll["id"]) == expected
            stored = await stored_vote_ids(settings.database_url, poll["id"])
            assert len(stored) == len(set(stored))
            assert set(stored) == ledger.accepted[poll["id"]]


# -- signals ------------------------------------------------------------------


@dataclass
class Flood:
    """Concurrent clients sending one-option ballots with client-chosen vote_ids
    to a multiple-vote poll (so every accepted vote_id counts) until stopped."""

    session: aiohttp.ClientSession
    edge: Process
    poll: dict[str, Any]
    # vote_id -> body of every ballot answered 202
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    # vote_id -> body of every ballot whose answer never came
    unanswered: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[BaseException] = field(default_factory=list)
    accepted_at: list[float] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, n: int, stop_on_connection_error: bool) -> None:
        options = option_ids_of(self.poll)
        rng = random.Random(n)
        while not self.stop.is_set():
            vote_id = str(uuid.uuid4())
            body = {
                "poll_id": self.poll["id"],
                "option_ids": [rng.choice(options)],
                "voter_fingerprint": f"flood-{n}",
                "vote_id": vote_id,
            }
            try:
                async with self.session.post(f"{self.edge.url}/api/vote", json=body) as response:
                    await response.read()
                    self.statuses[response.status] += 1
                    if response.status == 202:
                        self.accepted[vote_id] = body
                        self.accepted_at.append(time.monotonic())
            except aiohttp.ClientConnectionError as exc:
                self.errors.append(exc)
                self.unanswered[vote_id] = body
                if stop_on_connection_error:
                    return
                await asyncio.sleep(0.05)

    def run(self, clients: int, stop_on_connection_error: bool = False) -> asyncio.Future[Any]:
        return asyncio.gather(*(self.client(n, stop_on_connection_error) for n in range(clients)))

    async def finish(self, sending: asyncio.Future[Any]) -> None:
        self.stop.set()
        async with asyncio.timeout(30):
            await sending


async def check_counted_once(
    session: aiohttp.ClientSession,
    edge: Process,
    settings: Settings,
    poll: dict[str, Any],
    accepted: dict[str, dict[str, Any]],
) -> None:
    """The multiple-vote poll holds exactly the accepted votes, each once, and
    its results equal both their tally and a recount."""
    stored = await stored_vote_ids(settings.database_url, poll["id"])
    assert len(stored) == len(set(stored))
    assert set(stored) == set(accepted)
    expected = tally_of((body["option_ids"] for body in accepted.values()), option_ids_of(poll))
    result = await get_results(session, edge, poll["id"])
    assert votes_by_option(result) == expected
    assert result["total_ballots"] == len(accepted)
    assert await recount(settings.database_url, poll["id"]) == expected


async def test_worker_sigterm_finishes_its_batch_and_exits_promptly(
    cluster: Cluster, settings: Settings, redis: aioredis.Redis
) -> None:
    (edge,), (worker,) = await cluster.start(edges=1, workers=1)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B", "C"], allow_multiple_votes=True)
        flood = Flood(session, edge, poll)
        sending = flood.run(clients=64)
        try:
            # The worker is busy committing a stream that keeps growing.
            async def committed() -> bool:
                return await count_votes(settings.database_url) >= 500

            await until(committed, timeout=30, what="the worker commits 500 votes")
            status = await worker.terminate()
            assert status == 0, worker.log_tail()
            # Votes keep arriving while no worker runs.
            before = len(flood.accepted)
            await until(
                lambda: len(flood.accepted) >= before + 200,
                timeout=15,
                what="200 more votes accepted",
            )
        finally:
            await flood.finish(sending)
        assert set(flood.statuses) == {202}, flood.statuses
        assert not flood.errors, flood.errors[:3]
        # It finished what it had read: committed and acknowledged, nothing
        # left pending for another worker to reclaim.
        for shard, consumer in enumerate(await cluster.consumers_of(worker)):
            assert consumer is not None and consumer["pending"] == 0, (shard, consumer)
        await cluster.start(workers=1)
        await drain(redis, settings, timeout=60)
        await check_counted_once(session, edge, settings, poll, flood.accepted)


async def test_edge_sigterm_answers_requests_in_flight_and_exits(
    cluster: Cluster, settings: Settings, redis: aioredis.Redis
) -> None:
    (edge,), _ = await cluster.start(edges=1, workers=1)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B", "C"], allow_multiple_votes=True)
        flood = Flood(session, edge, poll)
        sending = flood.run(clients=64, stop_on_connection_error=True)
        try:
            await until(lambda: len(flood.accepted) >= 500, timeout=30, what="500 votes accepted")
            signalled = time.monotonic()
            status = await edge.terminate()
            assert status == 0, edge.log_tail()
        finally:
            await flood.finish(sending)
        # Each request was answered 202 or lost with its connection; none got
        # a 5xx (or any other status) from the edge shutting down.
        assert set(flood.statuses) == {202}, flood.statuses
        assert all(isinstance(e, aiohttp.ClientConnectionError) for e in flood.errors)
        # Requests it was handling when the signal came were answered.
        answered_late = sum(1 for t in flood.accepted_at if t > signalled)
        assert answered_late > 0
        # A request that lost its connection was never queued: the edge
        # answers every vote it appends.
        await drain(redis, settings, timeout=60)
        stored = set(await stored_vote_ids(settings.database_url, poll["id"]))
        assert not stored & set(flood.unanswered)
        # Their clients retry on another edge, with the same vote_ids.
        (other,), _ = await cluster.start(edges=1)
        for vote_id, body in flood.unanswered.items():
            assert await post_vote(session, other, body) == vote_id
        await drain(redis, settings, timeout=60)
        await check_counted_once(
            session, other, settings, poll, {**flood.accepted, **flood.unanswered}
        )


# -- a rule that needs a backlog ---------------------------------------------


async def test_resent_vote_id_queued_behind_a_later_ballot_does_not_replace_it(
    cluster: Cluster, settings: Settings, redis: aioredis.Redis
) -> None:
    (edge,), (worker,) = await cluster.start(edges=1, workers=1)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B"])
        a, b = option_ids_of(poll)
        first = {"poll_id": poll["id"], "option_ids": [a], "voter_fingerprint": "v"}
        # The edge chooses this vote_id; the ballot is committed.
        first["vote_id"] = await post_vote(session, edge, first)
        await drain(redis, settings, timeout=30)
        # While no worker runs (a restart, a backlog), the voter votes B, then
        # its client sends the first ballot again with the vote_id it was given.
        assert await worker.terminate() == 0
        later = {"poll_id": poll["id"], "option_ids": [b], "voter_fingerprint": "v"}
        await post_vote(session, edge, later)
        assert await post_vote(session, edge, first) == first["vote_id"]
        await cluster.start(workers=1)
        await drain(redis, settings, timeout=30)
        result = await get_results(session, edge, poll["id"])
        assert await recount(settings.database_url, poll["id"]) == votes_by_option(result)
        assert votes_by_option(result) == {a: 0, b: 1}
