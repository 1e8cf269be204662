"""The command line of the bench: which stages, how long, how many times; the run itself."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from types import FrameType
from typing import Any

from voteflow.cli import positive

from . import compare, goals, report, timing, wrk
from .ceiling import HttpCeiling
from .cluster_cost import ClusterCost
from .cost import Cost
from .drain import Drain
from .edge import Edge, EdgeProcesses, EdgeVoterTokens
from .fanout import FanOut
from .naive import Naive
from .replicas import Confirmed, Unconfirmed
from .spike import Spike
from .stack import Bench, Options, progress
from .stage import Sample, Stage, WrkStage
from .steady import Steady

# The stages built so far, by number. Each is a module of its own with a Stage
# subclass (stage.py); a new one is registered here and runs in the rounds
# like the others.
STAGES: dict[int, type[Stage]] = {
    1: HttpCeiling,
    2: Edge,
    3: Naive,
    4: Drain,
    5: Steady,
    6: Spike,
    7: Cost,
    8: FanOut,
    9: Unconfirmed,
    10: Confirmed,
    11: ClusterCost,
    12: EdgeProcesses,
    13: EdgeVoterTokens,
}


# The sizes of a run: the default fits in about 10 minutes on 2 cores with
# every stage, --quick in about 3 (one round: no spread, a first look). An
# option given on the command line wins over either.
FULL = {
    "repeats": 3,
    "duration": 8,
    "drain_votes": 300_000,
    "steady_duration": 20,
    "spike_votes": 50_000,
    "watchers": 10_000,
}
QUICK = {
    "repeats": 1,
    "duration": 5,
    "drain_votes": 100_000,
    "steady_duration": 10,
    "spike_votes": 20_000,
    "watchers": 5_000,
}


def _sized(name: str, what: str) -> str:
    """The help's default of a sized option: the full run's and --quick's."""
    full, quick = FULL[name], QUICK[name]
    return f"{what} (default: {full:,}; --quick: {quick:,})"


def _stages(text: str) -> list[int]:
    try:
        numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of stage numbers: {text!r}") from None
    for n in numbers:
        if n not in STAGES:
            raise argparse.ArgumentTypeError(f"no stage {n}; stages: {sorted(STAGES)}")
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
    # The whole-number options: (flag, what it sets, its default; None: sized,
    # the full run's or --quick's).
    numbers: tuple[tuple[str, str, int | None], ...] = (
        ("--repeats", "rounds", None),
        ("--duration", "seconds per measured run", None),
        ("--warmup", "seconds of the warm-up run of each stage (default: a third of "
         "--duration, 1-3)", 0),
        ("--connections", "wrk's open connections", 64),
        ("--threads", "wrk's threads (each drives its share of the connections)", 1),
        ("--drain-votes", "stage 4: votes queued before the workers start", None),
        ("--drain-workers", "stage 4: worker processes draining them", 1),
        ("--drain-repeats", "stage 4: repeats, at most --repeats; the stage is long", 1),
        ("--steady-rate", "stage 5: votes/s offered (default: half of stage 2's rate in "
         "this run)", 0),
        ("--steady-duration", "stage 5: seconds of each run", None),
        ("--spike-votes", "stage 6: votes in the spike", None),
        ("--spike-connections", "stage 6: wrk's connections for the spike", 1000),
        ("--watchers", "stage 8: SSE watchers of one poll", None),
        ("--fanout-rate", "stage 8: votes/s while they watch", 200),
    )  # fmt: skip
    for flag, what, default in numbers:
        if default is None:
            what = _sized(flag[2:].replace("-", "_"), what)
        elif default:
            what += f" (default: {default:,})"
        parser.add_argument(flag, type=positive, default=default, help=what)
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
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.threads > min(args.connections, args.spike_connections):
        parser.error("--threads must not exceed --connections nor --spike-connections")
    if args.spike_votes % args.threads:
        parser.error("--spike-votes must split evenly over --threads")
    if not args.warmup:
        args.warmup = min(3, max(1, args.duration // 3))
    return args


def options_of(args: argparse.Namespace, wrk_path: str) -> Options:
    """The run's options from its command line."""
    return Options(
        wrk=wrk_path, **{f.name: getattr(args, f.name) for f in fields(Options) if f.name != "wrk"}
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# Called after each sample with every stage and the samples so far.
Save = Callable[[list[Stage], dict[int, list[Sample]]], None]


def _label(stage: Stage) -> str:
    return f"{stage.number} {stage.name}"


def _measure(
    options: Options,
    stages: list[Stage],
    samples: dict[int, list[Sample]],
    machine: dict[str, Any],
    save: Save,
    took: dict[int, timing.Took],
    left: Callable[[], float],
) -> None:
    numbers = [stage.number for stage in stages]
    with ExitStack() as stack:
        work_dir = Path(
            stack.enter_context(
                TemporaryDirectory(prefix="voteflow-bench-", ignore_cleanup_errors=True)
            )
        )
        machine["data_filesystem"] = report.filesystem(work_dir)
        bench = Bench(options, stack, work_dir)
        bench.rates = {n: [] for n in numbers}
        try:
            for stage in stages:
                progress(f"starting stage {_label(stage)}")
                with timing.timed(took[stage.number], "start"):
                    stage.start(bench)
            for stage in stages:
                if isinstance(stage, WrkStage):
                    progress(f"warming up {stage.name} ({options.warmup}s)")
                with timing.timed(took[stage.number], "warm_up"):
                    stage.warm_up()
            for round_ in range(1, options.repeats + 1):
                for stage in stages:
                    if isinstance(stage, Drain) and round_ > stage.rounds(options):
                        continue
                    with timing.timed(took[stage.number], "round"):
                        sample = stage.measure()
                    samples[stage.number].append(sample)
                    bench.rates[stage.number].append(sample.rate)
                    save(stages, samples)
                    progress(
                        f"round {round_}/{options.repeats} {stage.number} {stage.name}: "
                        f"{sample.rate:,.0f} {stage.unit}, p99 {sample.p99_ms:.1f} ms, "
                        f"non-2xx {sample.non_2xx}, server CPU {sample.server_cpu_percent:.0f}%, "
                        f"wrk CPU {sample.wrk_cpu_percent:.0f}%; about "
                        f"{timing.minutes(left())} left"
                    )
        finally:
            # Stopping is bounded (each process gets seconds, then SIGKILL):
            # let a second Ctrl-C not cut it short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            progress("stopping everything the bench started")


def _say_kept(path: Path) -> None:
    if path.exists():
        print(f"bench: what it measured before that is in {path} (\"complete\": false)",
              file=sys.stderr)  # fmt: skip


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
    options = options_of(args, wrk_path or "")  # only the stages measured by wrk use it
    started = datetime.now(UTC)
    machine: dict[str, Any] = {
        "wrk": wrk.version(wrk_path) if wrk_path else None,
        "loadavg_before": list(os.getloadavg()),
    }
    settings = {
        "stages": args.stages,
        "repeats": options.repeats,
        "duration_s": options.duration,
        "warmup_s": options.warmup,
        "connections": options.connections,
        "wrk_threads": options.threads,
        "drain": {
            "votes": args.drain_votes,
            "workers": args.drain_workers,
            "repeats": args.drain_repeats,
        },
        "steady": {"rate": args.steady_rate or None, "duration_s": args.steady_duration},
        "spike": {"votes": args.spike_votes, "connections": args.spike_connections},
        "fanout": {"watchers": args.watchers, "rate": args.fanout_rate},
    }

    kept = report.results_path(started, args.results_dir)
    stages = [STAGES[n]() for n in args.stages]
    samples: dict[int, list[Sample]] = {n: [] for n in args.stages}
    shared: set[str] = set()
    plans = {stage.number: stage.plan(options, shared) for stage in stages}
    took = {stage.number: timing.Took() for stage in stages}

    def timings() -> dict[str, Any]:
        return {str(n): timing.to_json(plans[n], took[n]) for n in plans}

    def left() -> float:
        """Seconds the plan gives the stages' parts not yet done."""
        return sum(
            (0 if took[n].start else plan.start)
            + (0 if took[n].warm_up else plan.warm_up)
            + plan.round * max(plan.rounds - len(took[n].rounds), 0)
            for n, plan in plans.items()
        )

    def save(stages: list[Stage], samples: dict[int, list[Sample]]) -> None:
        rows = report.rows(stages, samples)
        figures = report.document(rows, started, settings, machine, complete=False)
        report.write_json(figures | {"timing": timings()}, kept)

    planned = timing.plan_table([(_label(s), plans[s.number]) for s in stages])
    progress(
        f"the plan ({options.repeats} round(s) of {options.duration}s; a busy machine "
        f"takes longer):\n{planned}"
    )
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _measure(options, stages, samples, machine, save, took, left)
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        _say_kept(kept)
        return 130
    except RuntimeError as exc:
        print(f"bench: failed: {exc}", file=sys.stderr)
        _say_kept(kept)
        return 1
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    machine["loadavg_after"] = list(os.getloadavg())
    rows = report.rows(stages, samples)
    figures = report.document(rows, started, settings, machine)
    figures["goals"] = goals.judged(figures)
    figures["timing"] = timings()
    report.write_json(figures, kept)
    print(
        f"\nvoteflow bench, {started:%Y-%m-%d %H:%M} UTC: {report.rounds(rows)}; "
        f"{options.connections} connections, wrk {options.threads} thread(s), "
        f"{os.cpu_count()} CPUs (wrk on the same ones), server data on "
        f"{machine['data_filesystem']}\n"
    )
    print(report.table(rows))
    print()
    print(report.notes(rows))
    if costs := report.cost_table(rows):
        print()
        print(costs)
    before, after = (
        " ".join(f"{x:.2f}" for x in machine[k]) for k in ("loadavg_before", "loadavg_after")
    )
    print(f"  machine load average (1, 5, 15 min): {before} before, {after} after")
    print(f"\ngoals (ratios within this run):\n{goals.table([figures])}")
    print("\ntime (planned from the run's options before it started):")
    print(timing.took_table([(_label(s), plans[s.number], took[s.number]) for s in stages]))
    print(f"\nwritten to {kept}")
    return 0
