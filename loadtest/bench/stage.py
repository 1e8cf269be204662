"""What a stage is, and the stage measured by wrk against one server process.

A stage is started once (it brings up what it measures, on the run's
ExitStack), warmed up once, then measured once per round. The bench runs its
stages in rounds (1, 2, 3, then 1, 2, 3 again ...) so that the machine's
noise falls on all of them alike, and its ratios are taken within a round.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from voteflow.children import Child

from . import wrk
from .procs import tree_cpu, tree_cpu_used
from .stack import Bench, Options

# Seconds after wrk stops before its last requests are counted in storage:
# the server finishes the ones wrk stopped waiting for.
SETTLE = 0.5


# What a Sample takes from the wrk run it measured (0 for a stage without one).
FROM_WRK = "requests accepted non_2xx socket_errors timeouts seconds p50_ms p95_ms p99_ms max_ms"


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One measured repeat of a stage."""

    rate: float  # answers 202 per second
    requests: int = 0  # answers of any status
    accepted: int = 0  # answers 202
    non_2xx: int = 0
    socket_errors: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    wrk_cpu_percent: float = 0.0  # of one core
    server_cpu_seconds: float  # the process under test
    server_cpu_percent: float  # of one core; 100: the server saturates a core
    store_cpu_seconds: float | None  # Redis, or every PostgreSQL process; None: no store
    stored: int | None  # votes found in storage after the run; None: not counted
    # Figures particular to a stage (the edge's Redis pipelines, say), by name.
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of_run(
        cls,
        run: wrk.WrkRun,
        *,
        rate: float,
        server_cpu_seconds: float,
        wall_seconds: float,
        store_cpu_seconds: float | None,
        stored: int | None,
        extra: dict[str, float] | None = None,
    ) -> Sample:
        """A repeat measured by one wrk run: its answers and latencies, and the
        CPU the processes under test used over `wall_seconds`."""
        return cls(
            rate=rate,
            **{name: getattr(run, name) for name in FROM_WRK.split()},
            wrk_cpu_percent=run.cpu_percent,
            server_cpu_seconds=server_cpu_seconds,
            server_cpu_percent=100 * server_cpu_seconds / wall_seconds,
            store_cpu_seconds=store_cpu_seconds,
            stored=stored,
            extra=extra or {},
        )

    @property
    def server_cpu_per_1k(self) -> float:
        return 1000 * self.server_cpu_seconds / max(self.requests, 1)

    @property
    def store_cpu_per_1k(self) -> float | None:
        if self.store_cpu_seconds is None:
            return None
        return 1000 * self.store_cpu_seconds / max(self.requests, 1)


@dataclass(frozen=True, slots=True)
class Plan:
    """A stage's expected seconds (timing.py)."""

    start: float
    warm_up: float
    round: float
    rounds: int

    @property
    def total(self) -> float:
        return self.start + self.warm_up + self.round * self.rounds


class Stage(ABC):
    number: ClassVar[int]
    name: ClassVar[str]
    # What the row's figure counts, and what the stage is.
    unit: ClassVar[str] = "votes/s"
    title: ClassVar[str]
    # The row's ratio: (numerator stage, denominator stage) of the rates in
    # each round where both ran; None: no ratio on this row.
    ratio: ClassVar[tuple[int, int] | None] = None
    # False: the stage sends no requests (the drain), so it has no latency and no wrk.
    requests: ClassVar[bool] = True
    # Seconds to start what the stage measures, and the seconds a round takes
    # beyond its --duration (resetting storage, settling), read off a run.
    start_s: ClassVar[float] = 1.0
    round_overhead_s: ClassVar[float] = 1.0

    def plan(self, options: Options, started: set[str]) -> Plan:
        """The seconds this stage is expected to take in a run with `options`;
        `started` names what earlier stages of the run start for it too (a
        stage adds what it shares, such as the pipeline)."""
        return Plan(
            start=self.start_s,
            warm_up=options.warmup + SETTLE,
            round=options.duration + self.round_overhead_s,
            rounds=options.repeats,
        )

    @property
    def label(self) -> str:
        return f"{self.number} {self.name}"

    def rounds(self, options: Options) -> int:
        """How many of the run's rounds measure this stage."""
        return options.repeats

    @abstractmethod
    def start(self, bench: Bench) -> None:
        """Bring up what the stage measures; register its stopping on bench.stack."""

    @abstractmethod
    def warm_up(self) -> None:
        """An unmeasured run, before the first repeat."""

    @abstractmethod
    def measure(self) -> Sample:
        """One repeat."""

    def summary(self, samples: list[Sample]) -> str | None:
        """A line on the stage's own figures (in Sample.extra) under the table;
        None: they are listed by name."""
        return None


def median_extra(samples: list[Sample], name: str) -> float:
    """The median of one of the samples' extra figures."""
    return statistics.median(s.extra[name] for s in samples if name in s.extra)


class WrkStage(Stage):
    """wrk with ``vote.lua`` against one server process; its store's CPU counted too.

    A subclass's start() sets what is declared below, after calling
    super().start(bench).
    """

    url: str
    poll_id: str
    option_ids: list[str]
    server: Child  # the process under test
    # Its store's processes (each with those below it: PostgreSQL's backends).
    store_pids: list[int]

    def start(self, bench: Bench) -> None:
        self.bench = bench
        self.store_pids = []

    def reset(self) -> None:
        """Before each repeat: bring storage back to where the first repeat found it."""

    def stored(self) -> int | None:
        """After each repeat: how many votes storage holds (None: not counted)."""
        return None

    def _wrk(self, duration: int, load: wrk.Load | None = None) -> wrk.WrkRun:
        options = self.bench.options
        return wrk.run(
            options.wrk,
            self.url,
            duration=duration,
            connections=options.connections,
            threads=options.threads,
            poll_id=self.poll_id,
            option_ids=self.option_ids,
            load=load or wrk.Load(),
        )

    def warm_up(self) -> None:
        self._wrk(self.bench.options.warmup)
        time.sleep(SETTLE)

    def measure(self) -> Sample:
        self.reset()
        # The server's process tree: `voteflow edge --processes N` is a
        # supervisor and N edge processes.
        server_before = tree_cpu(self.server.pid)
        store_before = tree_cpu(*self.store_pids)
        run = self._wrk(self.bench.options.duration)
        self.server.check_alive()  # else its CPU cannot be read, and the run means nothing
        server_used = tree_cpu_used(server_before, tree_cpu(self.server.pid))
        store_used = None
        if self.store_pids:
            store_used = tree_cpu_used(store_before, tree_cpu(*self.store_pids))
        time.sleep(SETTLE)
        return Sample.of_run(
            run,
            rate=run.accepted / run.seconds,
            server_cpu_seconds=server_used,
            wall_seconds=run.wall_seconds,
            store_cpu_seconds=store_used,
            stored=self.stored(),
        )
