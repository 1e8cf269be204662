"""The command line of the bench: which stages, how long, how many times; the run itself."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from types import FrameType
from typing import Any

from voteflow.cli import positive

from . import compare, goals, report, timing, wrk
from .baselines import HttpCeiling, Naive
from .cost import ClusterCost, Cost
from .drain import Drain
from .edge import ClusterEdge, ConfirmedClusterEdge, Edge, EdgeProcesses, EdgeVoterTokens
from .fanout import FanOut
from .spike import Spike
from .stack import Bench, Options, progress
from .stage import Sample, Stage, WrkStage
from .steady import Steady

# Every stage, by number: a Stage subclass (stage.py) registered here runs in
# the rounds like the others.
STAGES: dict[int, type[Stage]] = {
    stage.number: stage
    for stage in (
        HttpCeiling, Edge, Naive, Drain, Steady, Spike, Cost, FanOut,
        ClusterEdge, ConfirmedClusterEdge, ClusterCost, EdgeProcesses, EdgeVoterTokens,
    )
}  # fmt: skip


def _stages(text: str) -> list[int]:
    try:
        numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of stage numbers: {text!r}") from None
    if unknown := set(numbers) - STAGES.keys():
        raise argparse.ArgumentTypeError(f"no stage {min(unknown)}; stages: {sorted(STAGES)}")
    if not numbers:
        raise argparse.ArgumentTypeError("no stage given")
    return numbers


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    stage_list = "\n".join(f"  {n} {cls.name}: {cls.title}" for n, cls in STAGES.items())
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description="voteflow's throughput next to what bounds it, measured side by side in "
        "one run, with wrk. The stages run in rounds (each stage once per round) after one "
        "warm-up each; the table shows medians over the rounds.",
        epilog=f"stages:\n{stage_list}\n\nexit status: 0 done, 1 the bench failed, 2 wrk "
        "missing or bad arguments, 130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stages",
        type=_stages,
        default=sorted(STAGES),
        help="comma-separated stage numbers (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every stage once, shorter and smaller: a first look in about 3 minutes",
    )
    for option in fields(Options):
        if "help" not in option.metadata:
            continue
        what, full, quick = (option.metadata[k] for k in ("help", "full", "quick"))
        if full is not None and full != quick:
            what += f" (default: {full:,}; --quick: {quick:,})"
        elif full is not None:
            what += f" (default: {full:,})"
        flag = "--" + option.name.replace("_", "-")
        parser.add_argument(flag, type=positive, help=what)
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("A.json", "B.json"),
        help="measure nothing: print two kept runs side by side, with B/A and each's goals",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=report.RESULTS_DIR,
        help=f"where the JSON goes (default: {report.RESULTS_DIR})",
    )
    args = parser.parse_args(argv)
    # An option given on the command line wins over either size.
    for option in fields(Options):
        if option.metadata and getattr(args, option.name) is None:
            size = option.metadata["quick" if args.quick else "full"]
            setattr(args, option.name, size or 0)
    if args.threads > min(args.connections, args.spike_connections):
        parser.error("--threads must not exceed --connections nor --spike-connections")
    if args.spike_votes % args.threads:
        parser.error("--spike-votes must split evenly over --threads")
    if not args.warmup:
        args.warmup = min(3, max(1, args.duration // 3))
    return args


def options_of(args: argparse.Namespace, wrk_path: str) -> Options:
    """The run's options from its command line."""
    given = {f.name: getattr(args, f.name) for f in fields(Options) if f.metadata}
    return Options(**given, wrk=wrk_path)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class Run:
    """One run of the bench: its stages, their plans, what each took and measured
    so far, and the JSON it keeps, rewritten after every sample."""

    def __init__(self, args: argparse.Namespace, options: Options) -> None:
        self.options = options
        self.started = datetime.now(UTC)
        self.kept = report.results_path(self.started, args.results_dir)
        self.stages = [STAGES[n]() for n in args.stages]
        self.samples: dict[int, list[Sample]] = {n: [] for n in args.stages}
        shared: set[str] = set()
        self.plans = {s.number: s.plan(options, shared) for s in self.stages}
        self.took = {s.number: timing.Took() for s in self.stages}
        # wrk's path is the machine's, not a setting of the run.
        self.settings = {"stages": args.stages} | asdict(options)
        del self.settings["wrk"]
        self.machine: dict[str, Any] = {
            "wrk": wrk.version(options.wrk) if options.wrk else None,
            "loadavg_before": list(os.getloadavg()),
        }

    def left(self) -> float:
        """Seconds the plan gives the stages' parts not yet done."""
        return sum(
            (0 if self.took[n].start else plan.start)
            + (0 if self.took[n].warm_up else plan.warm_up)
            + plan.round * max(plan.rounds - len(self.took[n].rounds), 0)
            for n, plan in self.plans.items()
        )

    def document(self, complete: bool) -> dict[str, Any]:
        figures = report.document(
            self.stages, self.samples, self.started, self.settings, self.machine, complete=complete
        )
        if complete:
            figures["goals"] = goals.judged(figures)
        timings = {str(n): timing.to_json(self.plans[n], self.took[n]) for n in self.plans}
        return figures | {"timing": timings}

    def measure(self) -> None:
        options = self.options
        with ExitStack() as stack:
            work_dir = Path(
                stack.enter_context(
                    TemporaryDirectory(prefix="voteflow-bench-", ignore_cleanup_errors=True)
                )
            )
            self.machine["data_filesystem"] = report.filesystem(work_dir)
            bench = Bench(options, stack, work_dir)
            bench.samples = self.samples
            try:
                for stage in self.stages:
                    progress(f"starting stage {stage.number} {stage.name}")
                    with timing.timed(self.took[stage.number], "start"):
                        stage.start(bench)
                for stage in self.stages:
                    if isinstance(stage, WrkStage):
                        progress(f"warming up {stage.name} ({options.warmup}s)")
                    with timing.timed(self.took[stage.number], "warm_up"):
                        stage.warm_up()
                for round_ in range(1, options.repeats + 1):
                    for stage in self.stages:
                        if round_ > stage.rounds(options):
                            continue
                        with timing.timed(self.took[stage.number], "round"):
                            sample = stage.measure()
                        self.samples[stage.number].append(sample)
                        report.write_json(self.document(complete=False), self.kept)
                        progress(
                            f"round {round_}/{options.repeats} {stage.number} {stage.name}: "
                            f"{sample.rate:,.0f} {stage.unit}, p99 {sample.p99_ms:.1f} ms, "
                            f"non-2xx {sample.non_2xx}, server CPU "
                            f"{sample.server_cpu_percent:.0f}%, wrk CPU "
                            f"{sample.wrk_cpu_percent:.0f}%; about "
                            f"{timing.minutes(self.left())} left"
                        )
            finally:
                # Stopping is bounded (each process gets seconds, then SIGKILL):
                # let a second Ctrl-C not cut it short.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                progress("stopping everything the bench started")

    def print(self) -> None:
        self.machine["loadavg_after"] = list(os.getloadavg())
        figures = self.document(complete=True)
        report.write_json(figures, self.kept)
        print(
            f"\nvoteflow bench, {self.started:%Y-%m-%d %H:%M} UTC: {report.rounds(figures)}; "
            f"{self.options.connections} connections, wrk {self.options.threads} thread(s), "
            f"{os.cpu_count()} CPUs (wrk on the same ones), server data on "
            f"{self.machine['data_filesystem']}\n"
        )
        print(report.table(figures, self.stages))
        print()
        print(report.notes(figures, self.stages, self.samples))
        if costs := report.cost_table(figures):
            print(f"\n{costs}")
        before, after = (
            " ".join(f"{x:.2f}" for x in self.machine[k])
            for k in ("loadavg_before", "loadavg_after")
        )
        print(f"  machine load average (1, 5, 15 min): {before} before, {after} after")
        print(f"\ngoals (ratios within this run):\n{goals.table([figures])}")
        print("\ntime (planned from the run's options before it started):")
        print(
            timing.took_table([(s, self.plans[s.number], self.took[s.number]) for s in self.stages])
        )
        print(f"\nwritten to {self.kept}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.compare:
        try:
            print(compare.compare(*args.compare))
        except (OSError, ValueError, KeyError) as exc:
            print(f"bench: cannot compare: {exc}", file=sys.stderr)
            return 2
        return 0
    wrk_path = wrk.find()
    if wrk_path is None and any(STAGES[n] is not Drain for n in args.stages):
        print(wrk.MISSING, file=sys.stderr)
        return 2
    run = Run(args, options_of(args, wrk_path or ""))
    planned = timing.plan_table([(s, run.plans[s.number]) for s in run.stages])
    progress(
        f"the plan ({run.options.repeats} round(s) of {run.options.duration}s; a busy machine "
        f"takes longer):\n{planned}"
    )
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run.measure()
    except (KeyboardInterrupt, RuntimeError) as exc:
        if isinstance(exc, KeyboardInterrupt):
            print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        else:
            print(f"bench: failed: {exc}", file=sys.stderr)
        if run.kept.exists():
            print(f'bench: what it measured before that is in {run.kept} ("complete": false)',
                  file=sys.stderr)  # fmt: skip
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    run.print()
    return 0
