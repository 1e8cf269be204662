"""What each process spends on a vote when the pipeline runs flat out: wrk
sends new votes as fast as it can for --duration seconds, and the repeat ends
when the last of them is committed. Its rate is votes committed per second
over that whole time; per process (edge, worker, Redis, every PostgreSQL
process, wrk), CPU seconds per 1,000 votes and peak memory (pipeline.Meter).

- Stage 7 on the pipeline of stages 5-8 (one Redis).
- Stage 11 on a Redis Cluster of 3 masters, in two shapes with a key prefix
  each, measured one after the other in each repeat: 1 edge + 1 worker (the
  table's row) and 2 + 2, with every 202 of wrk's ledger checked by
  loadtest.verdict.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

from . import wrk
from .pipeline import PROCESSES, Pipeline, PipelineStage
from .report import columns
from .stack import Bench, Options, progress
from .stage import Plan, Sample, Stage, median_extra

# A round's seconds over its --duration, for the plan: the worker commits the
# edge's backlog after wrk stops.
DRAIN_AFTER = 1.2
# Stage 11's edges and workers of each shape, the table's row first.
SHAPES = (1, 2)


class Cost(PipelineStage):
    number = 7
    name = "cost"
    title = "the pipeline flat out until all is committed: CPU and memory per process"

    def round_s(self, options: Options) -> float:
        return options.duration * DRAIN_AFTER

    def measure(self) -> Sample:
        poll = self.pipeline.new_poll()
        run = self.pipeline.measured(poll, self.bench.options.duration)
        stored = self.pipeline.total_ballots(poll[0])
        return run.sample(stored / run.wall, stored)


def label(n: int) -> str:
    return f"{n}x{n}"


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
        store = bench.store("cluster-pipeline", masters=3)
        self.shapes = [Pipeline(bench, store, f"bench11-{label(n)}", n) for n in SHAPES]

    def warm_up(self) -> None:
        for shape in self.shapes:
            progress(f"warming up {self.name} {label(shape.n)} ({self.bench.options.warmup}s)")
            shape.send(shape.new_poll(), self.bench.options.warmup)
            shape.wait_committed()

    def measure(self) -> Sample:
        extra: dict[str, float] = {}
        for shape in self.shapes:
            poll_id, options = shape.new_poll()
            with TemporaryDirectory(prefix="voteflow-cluster-cost-") as directory:
                load = wrk.Load(ledger=Path(directory) / "accepted")
                run = shape.measured((poll_id, options), self.bench.options.duration, load)
                ledger = wrk.ledger(Path(directory))
            exact, line, missing = shape.exactly_once(poll_id, ledger)
            stored = shape.total_ballots(poll_id)
            key = f"{label(shape.n)}."
            extra |= run.cost(key) | {
                f"{key}votes_per_s": stored / run.wall,
                f"{key}p99_ms": run.sent.p99_ms,
                f"{key}non_2xx": float(run.sent.non_2xx),
                f"{key}missing_202": float(missing),
                f"{key}exactly_once": 1.0 if exact else 0.0,
            }
            progress(
                f"{self.name} {label(shape.n)}: {stored / run.wall:,.0f} votes/s committed, "
                f"{len(ledger):,} answered 202, {run.sent.non_2xx} non-2xx; exactly once: "
                + ("OK" if exact else f"WRONG: {line}")
            )
            if shape.n == SHAPES[0]:
                row = run.sample(stored / run.wall, stored)
        if row.rate > 0:
            extra["rate_ratio"] = extra[f"{label(SHAPES[-1])}.votes_per_s"] / row.rate
        # The row's own cost figures keep the names stage 7's use, so the cost table shows both.
        return replace(row, extra=row.extra | extra)

    def summary(self, samples: list[Sample]) -> str:
        header = ("shape", "votes/s", *PROCESSES, "all", "p99 ms", "non-2xx", "exactly once")
        lines: list[tuple[str, ...]] = [header]
        for n in SHAPES:
            key = f"{label(n)}."
            cpus = [median_extra(samples, f"{key}cpu_s_per_1k.{group}") for group in PROCESSES]
            exact = sum(1 for s in samples if s.extra[f"{key}exactly_once"] == 1.0)
            plural = "s" if n > 1 else ""
            lines.append(
                (
                    f"{n} edge{plural} + {n} worker{plural}",
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
