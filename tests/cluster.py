"""Edges and workers as OS processes, for tests that signal, kill and restart them."""

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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from loadtest.verdict import verify
from tests.support import ADMIN, ADMIN_TOKEN, recount, votes_by_option
from voteflow.children import STOP_TIMEOUT, Child, spawn, stop_all
from voteflow.keys import GROUP, Keys, consumer_of
from voteflow.servers import free_port
from voteflow.settings import Settings

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 30.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=20)
# A flood stops when told to, or after this many votes per client.
MAX_FLOOD_VOTES_PER_CLIENT = 5000


class Process(Child):
    """An edge or a worker of a test (voteflow.children's Child), and an edge's base URL."""

    def __init__(
        self, role: str, popen: subprocess.Popen[bytes], log_path: Path, url: str = ""
    ) -> None:
        super().__init__(role, popen, log_path)
        self.url = url

    @property
    def role(self) -> str:
        return self.name

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


def voteflow_env(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    """The environment of a test's voteflow process: the test's database, Redis
    and key prefix, its admin token, `port`, no rate limits, and none of the
    shell's own VOTEFLOW_* variables; `extra` over all of it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEFLOW_")}
    env.update(
        VOTEFLOW_DATABASE_URL=settings.database_url,
        VOTEFLOW_REDIS_URL=settings.redis_url,
        VOTEFLOW_KEY_PREFIX=settings.key_prefix,
        VOTEFLOW_ADMIN_TOKEN=ADMIN_TOKEN,
        VOTEFLOW_PORT=str(port),
        VOTEFLOW_WORKER_METRICS_PORT="0",
        VOTEFLOW_RATE_LIMIT_PER_IP="0",
        VOTEFLOW_RATE_LIMIT_PER_VOTER="0",
        VOTEFLOW_STREAM_SHARDS=str(settings.stream_shards),
        VOTEFLOW_BATCH_SIZE=str(settings.batch_size),
        VOTEFLOW_CLAIM_IDLE_MS=str(settings.claim_idle_ms),
        VOTEFLOW_MAX_BACKLOG=str(settings.max_backlog),
    )
    env.update(extra)
    return env


def start_voteflow(
    args: list[str], env: dict[str, str], log_path: Path, port: int | None = None
) -> Process:
    """`voteflow <args>` (an edge when `port` is given, its URL then known),
    through the one harness of voteflow.children: it dies with the test."""
    role = args[0]
    child = spawn(role, [sys.executable, "-m", "voteflow", *args], env=env, cwd=REPO, log=log_path)
    url = "" if port is None else f"http://127.0.0.1:{port}"
    return Process(role, child.popen, log_path, url)


class Cluster:
    """The edge and worker processes of one test, and the means to watch them."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        redis: aioredis.Redis,
        env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        # Set in every process this cluster starts, over the defaults below.
        self.env = dict(env or {})
        self.keys = Keys(settings.key_prefix, settings.stream_shards)
        self.log_dir = log_dir
        self.redis = redis
        self.processes: list[Process] = []

    def _spawn(self, role: str) -> Process:
        port = free_port()
        env = voteflow_env(self.settings, port, **self.env)
        log_path = self.log_dir / f"{role}-{len(self.processes)}.log"
        process = start_voteflow([role], env, log_path, port if role == "edge" else None)
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
            mine = [c for c in consumers if consumer_of(c["name"], worker.pid)]
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
        killed = await asyncio.to_thread(stop_all, self.processes, STOP_TIMEOUT)
        problems = [f"the {p.role} outlived SIGTERM; killed\n{p.log_tail()}" for p in killed]
        for process in self.processes:
            assert process.popen.returncode is not None, f"{process.role} {process.pid} still runs"
            if process.popen.returncode not in (0, -signal.SIGKILL):
                problems.append(
                    f"the {process.role} exited with status {process.popen.returncode}\n"
                    f"{process.log_tail()}"
                )
        return problems


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


async def check_counted_once(
    session: aiohttp.ClientSession,
    edge: Process,
    settings: Settings,
    poll: dict[str, Any],
    accepted: dict[str, dict[str, Any]],
) -> None:
    """The multiple-vote poll holds exactly the accepted votes, each once
    (loadtest.verdict, as the load test and the bench judge theirs), and its
    results equal both their tally and a recount."""
    poll_id = uuid.UUID(poll["id"])
    records = [(uuid.UUID(vote_id), poll_id) for vote_id in accepted]
    outcome = await verify(settings.database_url, records)
    assert outcome.passed and not outcome.unexpected, (outcome.line, outcome.details)
    expected = tally_of((body["option_ids"] for body in accepted.values()), option_ids_of(poll))
    result = await get_results(session, edge, poll["id"])
    assert votes_by_option(result) == expected
    assert result["total_ballots"] == len(accepted)
    assert await recount(settings.database_url, poll["id"]) == expected


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
    # Seconds each client waits between its votes (0: as fast as answered).
    pause: float = 0.0

    async def client(self, n: int, stop_on_connection_error: bool) -> None:
        options = option_ids_of(self.poll)
        rng = random.Random(n)
        for _ in range(MAX_FLOOD_VOTES_PER_CLIENT):
            if self.stop.is_set():
                return
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
            if self.pause:
                await asyncio.sleep(self.pause)

    def run(self, clients: int, stop_on_connection_error: bool = False) -> asyncio.Future[Any]:
        return asyncio.gather(*(self.client(n, stop_on_connection_error) for n in range(clients)))

    async def finish(self, sending: asyncio.Future[Any]) -> None:
        self.stop.set()
        async with asyncio.timeout(30):
            await sending
