"""Stage 11, the pipeline on a Redis Cluster: 1 edge + 1 worker (the table's
row) and 2 + 2, each shape with a key prefix of its own on one cluster of 3
masters, measured as stage 7 (flat out until all is committed): votes/s, CPU
per vote and peak memory by group of processes, and every 202 of vote.lua's
ledger checked by loadtest.verdict. docs/benchmarks.md (stage 11) says how.
"""

from __future__ import annotations

import os
import resource
import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from loadtest.verdict import counted_once
from voteflow.keys import Keys
from voteflow.servers import RedisClusterServers

from . import wrk
from .cost import DRAIN_AFTER
from .edge import create_poll
from .pipeline import PROCESSES, STALL_TIMEOUT, Meter, cost
from .redis_cluster import SHARDS, client, cluster_env, node_pids, rewrite_every_aof
from .report import columns
from .stack import Bench, Options, progress, wait_drained
from .stage import Sample, Stage, median_extra
from .timing import Plan

NAME = "cluster-pipeline"
MASTERS = 3
# Edges and workers of each shape, the table's row first.
SHAPES = (1, 2)


def label(n: int) -> str:
    return f"{n}x{n}"


class Shape:
    """`n` edges and `n` workers on the cluster, with a key prefix of their own."""

    def __init__(
        self, bench: Bench, servers: RedisClusterServers, database_url: str, n: int
    ) -> None:
        self.bench = bench
        self.n = n
        self.database_url = database_url
        self.token = secrets.token_urlsafe(24)
        prefix = f"bench11-{label(n)}"
        common = cluster_env(servers, database_url, prefix) | {"VOTEFLOW_ADMIN_TOKEN": self.token}
        self.keys = Keys(prefix, SHARDS, cluster=True)
        self.urls, self.edges, self.workers = bench.voteflow(label(n), common, n)
        self.client = client(servers)
        bench.stack.callback(self.client.close)
        self.redis_pids = node_pids(servers)

    def new_poll(self) -> tuple[str, list[str]]:
        return create_poll(self.urls[0], self.token)

    def send(self, poll: tuple[str, list[str]], duration: int, ledger: Path | None) -> wrk.WrkRun:
        """A wrk process per edge, at once, the connections and threads split
        among them; their answers summed, their latencies the worst of them."""
        options = self.bench.options
        threads = max(1, options.threads // self.n)
        connections = max(threads, options.connections // self.n)

        def one(i: int) -> wrk.WrkRun:
            return wrk.run(
                options.wrk,
                self.urls[i],
                duration=duration,
                connections=connections,
                threads=threads,
                poll_id=poll[0],
                option_ids=poll[1],
                load=wrk.Load(
                    ledger=None if ledger is None else ledger / f"accepted-{i}", forwarded=True
                ),
            )

        # wrk.run reads its CPU from the reaped children's counters, which the
        # other wrk processes' would cloud: read them around all of them.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with ThreadPoolExecutor(self.n) as pool:
            runs = list(pool.map(one, range(self.n)))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return merge(runs, used)

    def wait_committed(self) -> None:
        for edge in self.edges:
            edge.check_alive()
        wait_drained(self.client, self.keys, self.workers, STALL_TIMEOUT)

    def meter(self, postgres_pid: int) -> Meter:
        singles = {f"edge.{i}": edge.pid for i, edge in enumerate(self.edges)}
        singles |= {f"worker.{i}": worker.pid for i, worker in enumerate(self.workers)}
        singles |= {f"redis.{i}": pid for i, pid in enumerate(self.redis_pids)}
        return Meter(singles=singles, trees={"postgresql": postgres_pid})


def merge(runs: list[wrk.WrkRun], cpu_seconds: float) -> wrk.WrkRun:
    """wrk runs made at once, as one: answers summed, latencies the worst."""
    return wrk.WrkRun(
        requests=sum(r.requests for r in runs),
        non_2xx=sum(r.non_2xx for r in runs),
        socket_errors=sum(r.socket_errors for r in runs),
        timeouts=sum(r.timeouts for r in runs),
        seconds=max(r.seconds for r in runs),
        p50_ms=max(r.p50_ms for r in runs),
        p95_ms=max(r.p95_ms for r in runs),
        p99_ms=max(r.p99_ms for r in runs),
        max_ms=max(r.max_ms for r in runs),
        cpu_seconds=cpu_seconds,
        wall_seconds=max(r.wall_seconds for r in runs),
        late=sum(r.late for r in runs),
        peak_rss_bytes=sum(r.peak_rss_bytes for r in runs),
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """One shape's measured run."""

    run: wrk.WrkRun
    cpu: dict[str, float]  # CPU seconds by group of processes (PROCESSES)
    peak: dict[str, int]  # bytes, by group
    wall: float  # from the first request until the last vote committed
    rows: int  # the poll's votes in PostgreSQL
    missing: int  # ledger vote_ids not in the poll
    exact: bool  # loadtest.verdict's: every 202 in the poll once, its tallies a recount

    @property
    def rate(self) -> float:
        return self.rows / self.wall

    def extra(self, prefix: str) -> dict[str, float]:
        found = {f"{prefix}votes_per_s": self.rate}
        found |= cost(self.cpu, self.peak, self.run.accepted, prefix)
        found[f"{prefix}p99_ms"] = self.run.p99_ms
        found[f"{prefix}non_2xx"] = float(self.run.non_2xx)
        found[f"{prefix}missing_202"] = float(self.missing)
        found[f"{prefix}exactly_once"] = 1.0 if self.exact else 0.0
        return found


class ClusterCost(Stage):
    number = 11
    name = "cluster-cost"
    title = (
        "the pipeline flat out on a 3-master Redis Cluster, 1 edge + 1 worker (row) and "
        "2 + 2: CPU per vote and exactly once; all on the same cores, so not scaling"
    )
    ratio = (11, 7)
    start_s = 4.0
    # Each shape sends for --duration, then commits its backlog.
    round_overhead_s = 0.5

    def plan(self, options: Options, started: set[str]) -> Plan:
        per_shape = options.duration * DRAIN_AFTER + self.round_overhead_s
        return Plan(
            start=self.start_s,
            warm_up=len(SHAPES) * options.warmup * DRAIN_AFTER,
            round=len(SHAPES) * per_shape,
            rounds=options.repeats,
        )

    def start(self, bench: Bench) -> None:
        self.bench = bench
        servers = bench.redis_cluster(NAME, MASTERS, 0)
        postgres, database_url = bench.database(NAME)
        assert postgres.pid is not None
        self.postgres_pid = postgres.pid
        self.database_url = database_url
        self.shapes = [Shape(bench, servers, database_url, n) for n in SHAPES]
        self.servers = servers

    def warm_up(self) -> None:
        for shape in self.shapes:
            progress(f"warming up {self.name} {label(shape.n)} ({self.bench.options.warmup}s)")
            shape.send(shape.new_poll(), self.bench.options.warmup, None)
            shape.wait_committed()

    def measure(self) -> Sample:
        outcomes = [self._run(shape) for shape in self.shapes]
        extra: dict[str, float] = {}
        for shape, outcome in zip(self.shapes, outcomes, strict=True):
            extra |= outcome.extra(f"{label(shape.n)}.")
        first = outcomes[0]
        # The row's own cost figures, under the names stage 7 uses, so the
        # cost table shows both.
        extra |= {k: v for k, v in first.extra("").items() if k.startswith(("cpu_s", "peak"))}
        if first.rate > 0:
            extra["rate_ratio"] = outcomes[-1].rate / first.rate
        return Sample.of_run(
            first.run,
            rate=first.rate,
            server_cpu_seconds=first.cpu["edge"] + first.cpu["worker"],
            wall_seconds=first.wall,
            store_cpu_seconds=first.cpu["redis"] + first.cpu["postgresql"],
            stored=first.rows,
            extra=extra,
        )

    def _run(self, shape: Shape) -> Outcome:
        poll = shape.new_poll()
        rewrite_every_aof(self.servers)
        with TemporaryDirectory(prefix="voteflow-cluster-cost-") as directory:
            started = time.monotonic()
            with shape.meter(self.postgres_pid) as meter:
                run = shape.send(poll, self.bench.options.duration, Path(directory))
                shape.wait_committed()
            wall = time.monotonic() - started
            ledger = wrk.ledger(Path(directory))
        verdict = counted_once(self.database_url, poll[0], ledger)
        cpu: dict[str, float] = dict.fromkeys(PROCESSES, 0.0)
        peak: dict[str, int] = dict.fromkeys(PROCESSES, 0)
        for name, seconds in meter.cpu.items():
            cpu[name.split(".")[0]] += seconds
        for name, size in meter.peak.items():
            peak[name.split(".")[0]] += size
        cpu["wrk"], peak["wrk"] = run.cpu_seconds, run.peak_rss_bytes
        # wrk sends every vote_id once: one answered 202 twice is wrong too.
        exact = verdict.passed and verdict.answered == verdict.distinct
        outcome = Outcome(
            run, cpu, peak, wall, verdict.stored, verdict.missing + verdict.wrong_poll, exact
        )
        progress(
            f"{self.name} {label(shape.n)}: {outcome.rate:,.0f} votes/s committed, "
            f"{len(ledger):,} answered 202, {run.non_2xx} non-2xx; exactly once: "
            + ("OK" if exact else f"WRONG: {verdict.line}")
        )
        return outcome

    def summary(self, samples: list[Sample]) -> str:
        header = ("shape", "votes/s", *PROCESSES, "all", "p99 ms", "non-2xx", "exactly once")
        lines: list[tuple[str, ...]] = [header]
        for n in SHAPES:
            key = f"{label(n)}."
            cpus = [median_extra(samples, f"{key}cpu_s_per_1k.{group}") for group in PROCESSES]
            exact = sum(1 for s in samples if s.extra[f"{key}exactly_once"] == 1.0)
            lines.append(
                (
                    f"{n} edge{'s' if n > 1 else ''} + {n} worker{'s' if n > 1 else ''}",
                    f"{median_extra(samples, f'{key}votes_per_s'):,.0f}",
                    *(f"{c:.3f}" for c in cpus),
                    f"{sum(cpus):.3f}",
                    f"{median_extra(samples, f'{key}p99_ms'):.1f}",
                    f"{sum(s.extra[f'{key}non_2xx'] for s in samples):.0f}",
                    f"{'OK' if exact == len(samples) else 'WRONG'} in {exact} of {len(samples)}",
                )
            )
        table = columns(lines, left=(0, len(header) - 1), rule=False, indent="    ")
        ratios = [s.extra["rate_ratio"] for s in samples if "rate_ratio" in s.extra]
        text = (
            f"medians of votes committed/s and CPU s per 1,000 votes answered 202, on "
            f"{os.cpu_count()} CPUs shared by every process (so 2 + 2 shows the cost per vote "
            f"and exactness, not how throughput scales)\n" + table
        )
        if ratios:
            text += (
                f"\n    {label(SHAPES[-1])} over {label(SHAPES[0])} votes/s, median of rounds "
                f"{statistics.median(ratios):.2f} (min-max {min(ratios):.2f}-{max(ratios):.2f})"
            )
        return text
