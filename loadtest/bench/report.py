"""The bench's figures: built once as the JSON document kept in bench/results/,
and every table printed from that document (the run's, the goals, --compare).

Each figure is the median over the repeats, with the min-max spread of the
rates; a ratio is the median of the ratios taken within each round (stages
measured back to back), which the machine's drifting load affects least.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from .stage import Sample, Stage

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
# The extras that hold each process's cost (pipeline.Meter.extra), shown in a
# table of their own.
COST_KEYS = ("cpu_s_per_1k.", "peak_mib.")
PERCENTILES = ("p50", "p95", "p99")

# A run as bench/results/ keeps it, and one stage's figures in its "stages".
Document = dict[str, Any]
Figures = dict[str, Any]


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None if there are none."""
    found = [float(value) for value in values if value is not None]
    return statistics.median(found) if found else None


def extra(figures: Figures, name: str) -> float | None:
    """The median over a stage's samples of one of its own figures (Sample.extra)."""
    return median(s["extra"].get(name) for s in figures["samples"] if "extra" in s)


def by_number(document: Document) -> dict[int, Figures]:
    """A kept run's stages that measured something, by number."""
    return {figures["stage"]: figures for figures in document["stages"] if figures.get("samples")}


def _ratio(
    of: tuple[int, int] | None, samples: Mapping[int, list[Sample]]
) -> dict[str, Any] | None:
    """Stage top's rate over stage bottom's in each round: the median and the min-max."""
    if of is None or not all(n in samples for n in of):
        return None
    top, bottom = of
    # Rounds both stages have finished: a run saved mid-round has one sample
    # more of the earlier stage.
    paired = zip(samples[top], samples[bottom], strict=False)
    per_round = [a.rate / b.rate for a, b in paired if b.rate > 0]
    if not per_round:
        return None
    return {
        "top": top, "bottom": bottom, "median": statistics.median(per_round),
        "low": min(per_round), "high": max(per_round), "of": f"{top}/{bottom}",
    }  # fmt: skip


def _figures(stage: Stage, samples: list[Sample], ratio: dict[str, Any] | None) -> Figures:
    """One stage's samples as measured, and their medians and totals."""
    kept = [
        asdict(s)
        | {"server_cpu_s_per_1k": s.server_cpu_per_1k, "store_cpu_s_per_1k": s.store_cpu_per_1k}
        for s in samples
    ]

    def median_of(name: str) -> float | None:
        return median(sample[name] for sample in kept)

    rates = [s.rate for s in samples]
    return {
        "stage": stage.number,
        "name": stage.name,
        "title": stage.title,
        "unit": stage.unit,
        "rate_median": statistics.median(rates),
        "rate_min": min(rates),
        "rate_max": max(rates),
        "latency_ms_median": {p: median_of(f"{p}_ms") for p in PERCENTILES},
        "ratio": ratio,
        "server_cpu_s_per_1k_median": median_of("server_cpu_s_per_1k"),
        "server_cpu_percent_median": median_of("server_cpu_percent"),
        "store_cpu_s_per_1k_median": median_of("store_cpu_s_per_1k"),
        "wrk_cpu_percent_median": median_of("wrk_cpu_percent"),
        "non_2xx_total": sum(s.non_2xx for s in samples),
        "socket_errors_total": sum(s.socket_errors for s in samples),
        "timeouts_total": sum(s.timeouts for s in samples),
        "samples": kept,
    }


def document(
    stages: Sequence[Stage],
    samples: Mapping[int, list[Sample]],
    started: datetime,
    settings: dict[str, Any],
    machine: dict[str, Any],
    *,
    complete: bool = True,
) -> Document:
    """The run's figures so far, as bench/results/ keeps them."""
    return {
        "started_at": started.isoformat(),
        "complete": complete,
        "command": [Path(sys.executable).name, "-m", "loadtest.bench", *sys.argv[1:]],
        "git": _git(),
        "settings": settings,
        "machine": machine | {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "stages": [
            _figures(stage, samples[stage.number], _ratio(stage.ratio, samples))
            for stage in stages
            if samples[stage.number]
        ],
    }


def columns(
    lines: Sequence[Sequence[str]], left: Container[int] = (0,), rule: bool = True, indent: str = ""
) -> str:
    """`lines` as aligned columns, the header first: the columns in `left`
    left-aligned, the others right-aligned; a rule under the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = [
        indent
        + "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]
    if rule:
        text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def ratio_cell(figures: Figures | None) -> str:
    ratio = figures and figures.get("ratio")
    return f"{ratio['of']} = {ratio['median']:.2f}" if ratio else "-"


def table(document: Document, stages: Sequence[Stage]) -> str:
    """The main table: a stage a line. A stage that sends no requests (the
    drain) has no latency and no wrk."""
    untimed = {stage.number for stage in stages if not stage.requests}
    header = (
        "stage", "rate (202/s)", "min-max", "p50/p95/p99 ms", "ratio",
        "server CPU s/1k", "server CPU %", "store CPU s/1k", "wrk CPU %", "non-2xx",
    )  # fmt: skip
    lines = [header]
    for figures in document["stages"]:
        timed = figures["stage"] not in untimed
        latency = "/".join(f"{figures['latency_ms_median'][p]:.1f}" for p in PERCENTILES)
        store = figures["store_cpu_s_per_1k_median"]
        lines.append(
            (
                f"{figures['stage']} {figures['name']}",
                f"{figures['rate_median']:,.0f}",
                f"{figures['rate_min']:,.0f}-{figures['rate_max']:,.0f}",
                latency if timed else "-",
                ratio_cell(figures),
                f"{figures['server_cpu_s_per_1k_median']:.3f}",
                f"{figures['server_cpu_percent_median']:.0f}",
                "-" if store is None else f"{store:.3f}",
                f"{figures['wrk_cpu_percent_median']:.0f}" if timed else "-",
                str(figures["non_2xx_total"]),
            )
        )
    return columns(lines, left=(0, 4))


def notes(document: Document, stages: Sequence[Stage], samples: Mapping[int, list[Sample]]) -> str:
    """Under the table: what each stage is, its ratio, its storage check, its
    own figures (Stage.summary, else their medians by name) and its errors."""
    kept = document["stages"]
    lines = [f"  {figures['stage']} {figures['name']}: {figures['title']}" for figures in kept]
    for ratio in (figures["ratio"] for figures in kept):
        if ratio is not None:
            lines.append(
                f"  ratio {ratio['of']}: stage {ratio['top']}'s rate over stage "
                f"{ratio['bottom']}'s, median of rounds {ratio['median']:.2f} "
                f"(min-max {ratio['low']:.2f}-{ratio['high']:.2f})"
            )
    lines.append("  CPU % is of one core: a server near 100 saturates its core; wrk near 100 would")
    lines.append("  be the bottleneck itself. store CPU: Redis (2), every PostgreSQL process (3).")
    summaries = {s.number: s.summary(samples[s.number]) for s in stages if samples[s.number]}
    for figures in kept:
        name, kept_samples = figures["name"], figures["samples"]
        stored = [s["stored"] for s in kept_samples]
        if None not in stored:
            short = [
                (s["accepted"], s["stored"]) for s in kept_samples if s["stored"] < s["accepted"]
            ]
            check = "MISSING votes: " + repr(short) if short else "every 202 stored"
            lines.append(f"  {name}: stored after each repeat {stored}: {check}")
        own = sorted(
            {key for s in kept_samples for key in s["extra"] if not key.startswith(COST_KEYS)}
        )
        if (summary := summaries[figures["stage"]]) is not None:
            lines.append(f"  {figures['stage']} {name}: {summary}")
        elif own:
            medians = ", ".join(f"{key} {extra(figures, key):.3g}" for key in own)
            lines.append(f"  {name} (medians): {medians}")
        if errors := figures["socket_errors_total"] + figures["timeouts_total"]:
            lines.append(f"  {name}: {errors} socket errors or timeouts")
    return "\n".join(lines)


def rounds(document: Document) -> str:
    """How many times each stage was measured (the drain, often fewer)."""
    counts = {figures["stage"]: len(figures["samples"]) for figures in document["stages"]}
    most = max(counts.values(), default=0)
    fewer = [f"stage {n} {k} time(s)" for n, k in counts.items() if k < most]
    return f"{most} round(s)" + (f" ({', '.join(fewer)})" if fewer else "")


def cost_table(document: Document) -> str:
    """Per process, CPU seconds per 1,000 votes and peak MiB (medians); "" if none."""
    measured = [f for f in document["stages"] if "cpu_s_per_1k.edge" in f["samples"][0]["extra"]]
    if not measured:
        return ""
    processes = [
        key.removeprefix("cpu_s_per_1k.")
        for key in measured[0]["samples"][0]["extra"]
        if key.startswith("cpu_s_per_1k.")
    ]
    lines = [("stage", *processes, "all")]
    for figures in measured:
        cpus = [extra(figures, f"cpu_s_per_1k.{process}") for process in processes]
        peaks = [extra(figures, f"peak_mib.{process}") for process in processes]
        cells = [f"{cpu:.3f} / {peak:,.0f}" for cpu, peak in zip(cpus, peaks, strict=True)]
        total = sum(cpu for cpu in cpus if cpu is not None)
        lines.append((f"{figures['stage']} {figures['name']}", *cells, f"{total:.3f}"))
    return (
        "cost by process: CPU seconds per 1,000 votes answered 202 / peak memory MiB "
        "(medians)\n" + columns(lines)
    )


@functools.cache  # once per run, not once per sample written
def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        repo = RESULTS_DIR.parents[1]
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.TimeoutExpired):
        return {}


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (fsync costs differ: ext4, tmpfs...)."""
    target = str(path.resolve()) + "/"
    holding = [
        mount
        for mount in psutil.disk_partitions(all=True)
        if target.startswith(mount.mountpoint.rstrip("/") + "/")
    ]
    if not holding:
        return "unknown"
    # The deepest mount point; of mounts on the same point, the last (on top).
    return sorted(holding, key=lambda mount: len(mount.mountpoint))[-1].fstype


def results_path(started: datetime, directory: Path) -> Path:
    """Where a run started at `started` keeps its figures."""
    return directory / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"


def write_json(figures: Document, path: Path) -> None:
    """Write `figures` to `path`, replacing it whole: the bench writes after
    every sample, so that a run cut short keeps what it measured, and a file
    is never left half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(figures, indent=2) + "\n")
    os.replace(partial, path)
