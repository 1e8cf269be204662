"""The whole of voteflow for stages 5-8 and 11: edges and workers, as `voteflow
up` runs them, on a store of the bench's, and what those stages read off it.

The edges trust the bench as their proxy (VOTEFLOW_TRUSTED_PROXIES=127.0.0.1)
and wrk sends each voter from an address of its own, so the rate limits run
as in a deployment: on, and never hit by a voter who votes once. Each repeat
votes on a poll of its own, so its votes are told apart in PostgreSQL.

When a vote was committed is read from PostgreSQL itself: the bench's server
tracks commit timestamps, and ``pg_xact_commit_timestamp(xmin)`` of a vote's
row is the moment its batch's transaction committed.
"""

from __future__ import annotations

import contextlib
import http.client
import secrets
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Self

import orjson

from loadtest.verdict import counted_once
from voteflow.servers import HOST

from . import wrk
from .edge import create_poll
from .procs import cpu_seconds, peak_rss, reset_peak_rss, tree_cpu, tree_cpu_used, tree_pss
from .stack import Bench, Options, Store, progress, sql, wait_drained
from .stage import Plan, Sample, Stage

# Re-exported: the steady stage and its tests read lags with it.
from .watchers import percentiles as percentiles

MAX_CONNECTIONS = 50_000
# Seconds without any progress after which waiting for commits has failed.
STALL_TIMEOUT = 60.0
# Seconds the live stream may take to show the last commit.
LIVE_TIMEOUT = 10.0
POLL_EVERY = 0.05
# Processes whose cost is measured, in the order reports show them.
PROCESSES = ("edge", "worker", "redis", "postgresql", "wrk")


@dataclass(frozen=True, slots=True)
class Committed:
    """One vote of a poll as PostgreSQL holds it (times in Unix seconds)."""

    vote_id: str
    received: float  # when the edge received it
    committed: float  # when its transaction committed
    xid: int  # that transaction


class Pipeline:
    """`n` edges and `n` workers on `store`, their keys under `prefix`."""

    def __init__(self, bench: Bench, store: Store, prefix: str, n: int = 1, **edge_env: str):
        self.bench, self.store, self.prefix, self.n = bench, store, prefix, n
        self.token = secrets.token_urlsafe(24)
        env = store.env(prefix) | {"VOTEFLOW_ADMIN_TOKEN": self.token}
        self.urls, self.edges, self.workers = bench.voteflow(prefix, env, n, **edge_env)
        self.keys = store.keys(prefix)
        self.client = store.client(bench.stack)
        self.warmed = False

    @property
    def url(self) -> str:
        return self.urls[0]

    def new_poll(self) -> tuple[str, list[str]]:
        return create_poll(self.url, self.token)

    def send(
        self,
        poll: tuple[str, list[str]],
        duration: int,
        load: wrk.Load | None = None,
        connections: int | None = None,
    ) -> wrk.WrkRun:
        """wrk against the edges (one wrk process for each), new voters of `poll`."""
        options = self.bench.options
        return wrk.run_each(
            options.wrk,
            self.urls,
            duration=duration,
            connections=connections or options.connections,
            threads=options.threads,
            poll_id=poll[0],
            option_ids=poll[1],
            load=replace(load or wrk.Load(), forwarded=True),
        )

    def wait_committed(self) -> None:
        """Wait until every vote in the streams is committed."""
        for edge in self.edges:
            edge.check_alive()
        wait_drained(self.client, self.keys, self.workers, STALL_TIMEOUT, POLL_EVERY)

    def committed(self, poll_id: str) -> list[Committed]:
        rows = sql(
            self.store.database_url,
            "SELECT vote_id::text, extract(epoch FROM received_at)::float8 AS received, "
            "extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 AS committed, "
            "xmin::text::bigint AS xid FROM votes WHERE poll_id = $1",
            poll_id,
            answer="fetch",
        )
        return [Committed(*row) for row in rows]

    def total_ballots(self, poll_id: str) -> int:
        query = "SELECT total_ballots FROM poll_counters WHERE poll_id = $1"
        return int(sql(self.store.database_url, query, poll_id, answer="fetchval"))

    def exactly_once(self, poll_id: str, ledger: list[str]) -> tuple[bool, str, int]:
        """loadtest.verdict's check of wrk's ledger of 202s for `poll_id`:
        (passed, its line, the vote_ids answered 202 missing from the poll).
        wrk sends every vote_id once: one answered 202 twice is wrong too."""
        outcome = counted_once(self.store.database_url, poll_id, ledger)
        exact = outcome.passed and outcome.answered == outcome.distinct
        return exact, outcome.line, outcome.missing + outcome.wrong_poll

    def meter(self) -> Meter:
        return Meter(
            {
                "edge": [edge.pid for edge in self.edges],
                "worker": [worker.pid for worker in self.workers],
                "redis": self.store.redis_pids,
            },
            postgres=self.store.postgres_pid,
        )

    def measured(
        self,
        poll: tuple[str, list[str]],
        duration: int,
        load: wrk.Load | None = None,
        connections: int | None = None,
        then: Callable[[], object] = lambda: None,
    ) -> Run:
        """A measured repeat on `poll`: wrk for `duration` s, until every vote is
        committed and `then` has run, each Redis node's file compacted first."""
        self.store.compact()
        began, started = time.time(), time.monotonic()
        with self.meter() as meter:
            sent = self.send(poll, duration, load, connections)
            self.wait_committed()
            then()
        return Run(sent, meter, time.monotonic() - started, began)


class Meter:
    """CPU seconds and peak memory of the pipeline's processes over one
    measured run, by group.

    Peak memory: the sum of the largest resident sets (VmHWM) of the group's
    processes during the run (their high-water marks are reset at its start);
    PostgreSQL's, the largest sum of its processes' proportional set sizes
    (their shared buffers counted once), sampled while the run lasts.
    """

    def __init__(self, groups: dict[str, list[int]], postgres: int) -> None:
        self.groups = groups
        self.postgres = postgres
        self.peak = {"postgresql": 0}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        for pid in (pid for pids in self.groups.values() for pid in pids):
            reset_peak_rss(pid)
        self._cpu = {name: sum(map(cpu_seconds, pids)) for name, pids in self.groups.items()}
        self._postgres_cpu = tree_cpu(self.postgres)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.peak["postgresql"] = max(self.peak["postgresql"], tree_pss(self.postgres))

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._sampler.join()
        self.cpu = {
            name: sum(map(cpu_seconds, pids)) - self._cpu[name]
            for name, pids in self.groups.items()
        }
        self.cpu["postgresql"] = tree_cpu_used(self._postgres_cpu, tree_cpu(self.postgres))
        self.peak["postgresql"] = max(self.peak["postgresql"], tree_pss(self.postgres))
        self.peak |= {name: sum(map(peak_rss, pids)) for name, pids in self.groups.items()}


@dataclass(frozen=True, slots=True)
class Run:
    """A measured run of the pipeline: what wrk saw, what each process spent,
    and the seconds from its first request until its last commit."""

    sent: wrk.WrkRun
    meter: Meter
    wall: float
    began: float  # Unix seconds

    def cost(self, prefix: str = "") -> dict[str, float]:
        """Per process (PROCESSES): CPU seconds per 1,000 votes answered 202 and
        peak MiB, as a Sample's extras (their names after `prefix`)."""
        cpu = self.meter.cpu | {"wrk": self.sent.cpu_seconds}
        peak = self.meter.peak | {"wrk": self.sent.peak_rss_bytes}
        found = {}
        for name in PROCESSES:
            found[f"{prefix}cpu_s_per_1k.{name}"] = 1000 * cpu[name] / max(self.sent.accepted, 1)
            found[f"{prefix}peak_mib.{name}"] = peak[name] / 2**20
        return found

    def sample(self, rate: float, stored: int, extra: dict[str, float] | None = None) -> Sample:
        """A repeat's Sample: voteflow's own processes (edges and workers) as
        the server, Redis and PostgreSQL as the store; each process's cost
        and `extra` in its extras."""
        cpu = self.meter.cpu
        return Sample.of_run(
            self.sent,
            rate=rate,
            server_cpu_seconds=cpu["edge"] + cpu["worker"],
            wall_seconds=self.wall,
            store_cpu_seconds=cpu["redis"] + cpu["postgresql"],
            stored=stored,
            extra=self.cost() | (extra or {}),
        )


class LiveWatcher:
    """A dashboard: the SSE stream of one poll, each tally's arrival time noted."""

    def __init__(self, url: str, poll_id: str) -> None:
        self.events: list[tuple[float, int]] = []  # (Unix s, total_ballots)
        self._conn = http.client.HTTPConnection(HOST, int(url.rsplit(":", 1)[1]), timeout=30)
        self._conn.request(
            "GET", f"/api/polls/{poll_id}/live", headers={"Accept": "text/event-stream"}
        )
        response = self._conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"live stream of {poll_id}: HTTP {response.status}")
        self._response = response
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._response:
                if line.startswith(b"data:"):
                    total = orjson.loads(line[5:])["total_ballots"]
                    self.events.append((time.time(), int(total)))
        except (OSError, ValueError, http.client.HTTPException):
            pass  # closed by close(), or the edge went away: the events so far stand

    def wait_for(self, total: int, timeout: float = LIVE_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.events and self.events[-1][1] >= total:
                return True
            time.sleep(POLL_EVERY)
        return False

    def close(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._conn.close()

    def lags(self, votes: list[Committed]) -> tuple[list[float], int]:
        """Seconds from each vote's receipt to the first live update that counts it,
        and how many votes no update counted.

        The poll's counter row is locked by each batch until it commits, so its
        transactions commit one after another, and after the k-th, the tally
        counts exactly the votes of the first k (every voter here is new).
        """
        by_xid: dict[int, list[Committed]] = {}
        for vote in votes:
            by_xid.setdefault(vote.xid, []).append(vote)
        order = sorted(by_xid.values(), key=lambda batch: batch[0].committed)
        arrivals = [at for at, _ in self.events]
        totals = [total for _, total in self.events]
        # Events arrive in version order; a later one never counts fewer votes.
        for i in range(1, len(totals)):
            totals[i] = max(totals[i], totals[i - 1])
        lags: list[float] = []
        missed = 0
        counted = 0
        for batch in order:
            counted += len(batch)
            i = bisect_left(totals, counted)
            if i == len(totals):
                missed += len(batch)
                continue
            lags += [arrivals[i] - vote.received for vote in batch]
        return lags, missed


class PipelineStage(Stage):
    """A stage of stages 5-8, on their one pipeline: one edge and one worker
    on a store of their own (so that the memory the drain took is not
    counted as theirs), with default settings and rate limits on."""

    # Starting the pipeline and warming it up, paid by the first such stage.
    start_s = 1.5
    # Seconds a round takes beyond what it sends: the worker's tail of commits,
    # Redis compacting its file, a new poll.
    round_overhead_s = 1.0

    def round_s(self, options: Options) -> float:
        """Seconds of one round without the overhead."""
        return float(options.duration)

    def plan(self, options: Options, started: set[str]) -> Plan:
        first = "pipeline" not in started
        started.add("pipeline")
        return Plan(
            start=self.start_s if first else 0.0,
            warm_up=options.warmup + 1.0 if first else 0.0,
            round=self.round_s(options) + self.round_overhead_s,
            rounds=options.repeats,
        )

    def start(self, bench: Bench) -> None:
        self.bench = bench
        # Stage 8's watchers, and the votes beside them, all come from the
        # bench's one address.
        self.pipeline = bench.share(
            "pipeline",
            lambda: Pipeline(
                bench, bench.store("pipeline"), "e2e",
                VOTEFLOW_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
                VOTEFLOW_LIVE_MAX_PER_ADDRESS=str(MAX_CONNECTIONS),
            ),
        )  # fmt: skip

    def warm_up(self) -> None:
        """One unmeasured run at full speed, for the first such stage only."""
        if self.pipeline.warmed:
            return
        self.pipeline.warmed = True
        progress(f"warming up the pipeline ({self.bench.options.warmup}s)")
        self.pipeline.send(self.pipeline.new_poll(), self.bench.options.warmup)
        self.pipeline.wait_committed()
