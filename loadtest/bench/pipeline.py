"""The whole of voteflow for stages 5-7: one edge and one worker, as `voteflow up`
runs them, on the bench's private servers, and what those stages read off it.

The edge trusts the bench as its proxy (VOTEFLOW_TRUSTED_PROXIES=127.0.0.1) and
wrk sends each voter from an address of its own, so the rate limits run as in
a deployment: on, and never hit by a voter who votes once. Each repeat votes on
a poll of its own, so its votes are told apart in PostgreSQL.

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
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Self

import orjson
import redis

from voteflow.keys import Keys
from voteflow.servers import HOST

from . import wrk
from .edge import SHARDS, create_poll
from .procs import cpu_seconds, peak_rss, reset_peak_rss, tree_cpu, tree_cpu_used, tree_pss
from .stack import Bench, Options, progress, rewrite_aof, sql, wait_drained
from .stage import Sample, Stage
from .timing import Plan

# Re-exported: the steady stage and its tests read lags with it.
from .watchers import percentiles as percentiles

KEY_PREFIX = "e2e"
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
    """One edge and one worker on the bench's servers, started on first use."""

    def __init__(self, bench: Bench) -> None:
        servers = bench.servers("pipeline")
        self.bench = bench
        self.database_url = servers.database_url
        self.postgres_pid = servers.postgres.pid
        self.redis_pid = servers.redis.pid
        self.keys = Keys(KEY_PREFIX, SHARDS)
        self.token = secrets.token_urlsafe(24)
        common = {
            "VOTEFLOW_DATABASE_URL": servers.database_url,
            "VOTEFLOW_REDIS_URL": servers.redis.url,
            "VOTEFLOW_ADMIN_TOKEN": self.token,
            "VOTEFLOW_KEY_PREFIX": KEY_PREFIX,
            "VOTEFLOW_STREAM_SHARDS": str(SHARDS),
            "VOTEFLOW_LOG_LEVEL": "WARNING",
        }
        # Stage 8's watchers and the votes beside them; the watchers all come
        # from the bench's one address.
        (self.url,), (self.edge,), (self.worker,) = bench.voteflow(
            "e2e",
            common,
            VOTEFLOW_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
            VOTEFLOW_LIVE_MAX_PER_ADDRESS=str(MAX_CONNECTIONS),
        )
        self.port = int(self.url.rsplit(":", 1)[1])
        self.redis = redis.Redis.from_url(servers.redis.url, socket_timeout=30)
        bench.stack.callback(self.redis.close)
        self.warmed = False

    def check_alive(self) -> None:
        self.edge.check_alive()
        self.worker.check_alive()

    def new_poll(self) -> tuple[str, list[str]]:
        return create_poll(self.url, self.token)

    def rewrite_aof(self) -> None:
        rewrite_aof(self.redis)

    def wait_committed(self) -> None:
        """Wait until every vote in the streams is committed."""
        self.edge.check_alive()
        wait_drained(self.redis, self.keys, [self.worker], STALL_TIMEOUT, POLL_EVERY)

    def committed(self, poll_id: str) -> list[Committed]:
        rows = sql(
            self.database_url,
            "SELECT vote_id::text, extract(epoch FROM received_at)::float8 AS received, "
            "extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 AS committed, "
            "xmin::text::bigint AS xid FROM votes WHERE poll_id = $1",
            poll_id,
            answer="fetch",
        )
        return [Committed(*row) for row in rows]

    def total_ballots(self, poll_id: str) -> int:
        query = "SELECT total_ballots FROM poll_counters WHERE poll_id = $1"
        return int(sql(self.database_url, query, poll_id, answer="fetchval"))

    def meter(self) -> Meter:
        assert self.postgres_pid is not None and self.redis_pid is not None
        return Meter(
            singles={"edge": self.edge.pid, "worker": self.worker.pid, "redis": self.redis_pid},
            trees={"postgresql": self.postgres_pid},
        )


class Meter:
    """CPU seconds and peak memory of the pipeline's processes over one measured run.

    Peak memory: the largest resident set (VmHWM) of the edge, the worker and
    Redis during the run (their high-water marks are reset at its start);
    PostgreSQL's, the largest sum of its processes' proportional set sizes,
    sampled while the run lasts.
    """

    def __init__(self, singles: dict[str, int], trees: dict[str, int]) -> None:
        self.singles = singles
        self.trees = trees
        self.peak: dict[str, int] = dict.fromkeys(trees, 0)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        for pid in self.singles.values():
            reset_peak_rss(pid)
        self._cpu = {name: cpu_seconds(pid) for name, pid in self.singles.items()}
        self._tree_cpu = {name: tree_cpu(pid) for name, pid in self.trees.items()}
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            for name, pid in self.trees.items():
                self.peak[name] = max(self.peak[name], tree_pss(pid))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._sampler.join()
        self.cpu = {name: cpu_seconds(pid) - self._cpu[name] for name, pid in self.singles.items()}
        for name, pid in self.trees.items():
            self.cpu[name] = tree_cpu_used(self._tree_cpu[name], tree_cpu(pid))
            self.peak[name] = max(self.peak[name], tree_pss(pid))
        for name, pid in self.singles.items():
            self.peak[name] = peak_rss(pid)

    def extra(self, votes: int, wrk_cpu: float, wrk_peak: int) -> dict[str, float]:
        """Per process: CPU seconds per 1,000 votes and peak MiB, as a Sample's extras."""
        return cost(self.cpu | {"wrk": wrk_cpu}, self.peak | {"wrk": wrk_peak}, votes)


def cost(
    cpu: dict[str, float], peak: dict[str, int], votes: int, prefix: str = ""
) -> dict[str, float]:
    """Per process (PROCESSES): CPU seconds per 1,000 votes and peak MiB, as
    a Sample's extras (their names after `prefix`)."""
    found = {}
    for name in PROCESSES:
        found[f"{prefix}cpu_s_per_1k.{name}"] = 1000 * cpu[name] / max(votes, 1)
        found[f"{prefix}peak_mib.{name}"] = peak[name] / 2**20
    return found


class LiveWatcher:
    """A dashboard: the SSE stream of one poll, each tally's arrival time noted."""

    def __init__(self, port: int, poll_id: str) -> None:
        self.events: list[tuple[float, int]] = []  # (Unix s, total_ballots)
        self._conn = http.client.HTTPConnection(HOST, port, timeout=30)
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
    """A stage measured on the pipeline, end to end: from wrk to PostgreSQL."""

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
        self.pipeline = bench.share(Pipeline)

    def warm_up(self) -> None:
        """One unmeasured run at full speed, for the first such stage only."""
        if self.pipeline.warmed:
            return
        self.pipeline.warmed = True
        progress(f"warming up the pipeline ({self.bench.options.warmup}s)")
        self.send(self.pipeline.new_poll(), self.bench.options.warmup)
        self.pipeline.wait_committed()

    def send(
        self,
        poll: tuple[str, list[str]],
        duration: int,
        load: wrk.Load | None = None,
        connections: int | None = None,
    ) -> wrk.WrkRun:
        options = self.bench.options
        return wrk.run(
            options.wrk,
            self.pipeline.url,
            duration=duration,
            connections=connections or options.connections,
            threads=options.threads,
            poll_id=poll[0],
            option_ids=poll[1],
            load=replace(load or wrk.Load(), forwarded=True),
        )

    def sample(
        self, run: wrk.WrkRun, meter: Meter, rate: float, wall: float, stored: int
    ) -> Sample:
        """A repeat's Sample: voteflow's own processes (edge and worker) as the
        server, Redis and PostgreSQL as the store; each process's cost in extra."""
        return Sample.of_run(
            run,
            rate=rate,
            server_cpu_seconds=meter.cpu["edge"] + meter.cpu["worker"],
            wall_seconds=wall,
            store_cpu_seconds=meter.cpu["redis"] + meter.cpu["postgresql"],
            stored=stored,
            extra=meter.extra(run.accepted, run.cpu_seconds, run.peak_rss_bytes),
        )
