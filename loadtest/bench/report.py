"""The bench's figures: one table on stdout, the same as JSON in bench/results/.

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
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .stage import Sample, Stage, median_extra

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
# The extras that hold each process's cost (pipeline.Meter.extra), shown in a
# table of their own.
COST_KEYS = ("cpu_s_per_1k.", "peak_mib.")


@dataclass(frozen=True, slots=True)
class Ratio:
    top: int  # stage top's rate over stage bottom's
    bottom: int
    median: float
    low: float
    high: float

    @property
    def of(self) -> str:
        return f"{self.top}/{self.bottom}"


@dataclass(frozen=True, slots=True)
class Row:
    stage: Stage
    samples: list[Sample]
    ratio: Ratio | None

    def median(self, figure: str) -> float:
        return statistics.median(float(getattr(sample, figure)) for sample in self.samples)

    def store_cpu_per_1k(self) -> float | None:
        values = [s.store_cpu_per_1k for s in self.samples if s.store_cpu_per_1k is not None]
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        rates = [sample.rate for sample in self.samples]
        return {
            "stage": self.stage.number,
            "name": self.stage.name,
            "title": self.stage.title,
            "unit": self.stage.unit,
            "rate_median": statistics.median(rates),
            "rate_min": min(rates),
            "rate_max": max(rates),
            "latency_ms_median": {p: self.median(f"{p}_ms") for p in ("p50", "p95", "p99")},
            "ratio": None if self.ratio is None else asdict(self.ratio) | {"of": self.ratio.of},
            "server_cpu_s_per_1k_median": self.median("server_cpu_per_1k"),
            "server_cpu_percent_median": self.median("server_cpu_percent"),
            "store_cpu_s_per_1k_median": self.store_cpu_per_1k(),
            "wrk_cpu_percent_median": self.median("wrk_cpu_percent"),
            "non_2xx_total": sum(s.non_2xx for s in self.samples),
            "socket_errors_total": sum(s.socket_errors for s in self.samples),
            "timeouts_total": sum(s.timeouts for s in self.samples),
            "samples": [
                asdict(s)
                | {
                    "server_cpu_s_per_1k": s.server_cpu_per_1k,
                    "store_cpu_s_per_1k": s.store_cpu_per_1k,
                }
                for s in self.samples
            ],
        }


def rows(stages: Sequence[Stage], samples: dict[int, list[Sample]]) -> list[Row]:
    found = []
    for stage in stages:
        ratio = None
        if stage.ratio is not None and all(n in samples for n in stage.ratio):
            top, bottom = (samples[n] for n in stage.ratio)
            # Rounds both stages have finished: a run saved mid-round has
            # one sample more of the earlier stage.
            paired = zip(top, bottom, strict=False)
            per_round = [a.rate / b.rate for a, b in paired if b.rate > 0]
            if per_round:
                median = statistics.median(per_round)
                ratio = Ratio(*stage.ratio, median, min(per_round), max(per_round))
        found.append(Row(stage, samples[stage.number], ratio))
    return found


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


def _int(value: float) -> str:
    return f"{value:,.0f}"


def table(found: Sequence[Row]) -> str:
    header = (
        "stage", "rate (202/s)", "min-max", "p50/p95/p99 ms", "ratio",
        "server CPU s/1k", "server CPU %", "store CPU s/1k", "wrk CPU %", "non-2xx",
    )  # fmt: skip
    lines = [header]
    for row in found:
        rates = [s.rate for s in row.samples]
        store = row.store_cpu_per_1k()
        timed = row.stage.requests
        latency = (
            "/".join(f"{row.median(f'{p}_ms'):.1f}" for p in ("p50", "p95", "p99"))
            if timed
            else "-"
        )
        lines.append(
            (
                f"{row.stage.number} {row.stage.name}",
                _int(statistics.median(rates)),
                f"{_int(min(rates))}-{_int(max(rates))}",
                latency,
                "-" if row.ratio is None else f"{row.ratio.of} = {row.ratio.median:.2f}",
                f"{row.median('server_cpu_per_1k'):.3f}",
                f"{row.median('server_cpu_percent'):.0f}",
                "-" if store is None else f"{store:.3f}",
                f"{row.median('wrk_cpu_percent'):.0f}" if timed else "-",
                str(sum(s.non_2xx for s in row.samples)),
            )
        )
    return columns(lines, left=(0, 4))


def notes(found: Sequence[Row]) -> str:
    lines = []
    for row in found:
        lines.append(f"  {row.stage.number} {row.stage.name}: {row.stage.title}")
    for row in found:
        if row.ratio is not None:
            lines.append(
                f"  ratio {row.ratio.of}: stage {row.ratio.top}'s rate over stage "
                f"{row.ratio.bottom}'s, median of rounds {row.ratio.median:.2f} "
                f"(min-max {row.ratio.low:.2f}-{row.ratio.high:.2f})"
            )
    lines.append("  CPU % is of one core: a server near 100 saturates its core; wrk near 100 would")
    lines.append("  be the bottleneck itself. store CPU: Redis (2), every PostgreSQL process (3).")
    for row in found:
        stored = [s.stored for s in row.samples]
        if all(x is not None for x in stored):
            short = [
                (s.accepted, s.stored)
                for s in row.samples
                if s.stored is not None and s.stored < s.accepted
            ]
            check = "MISSING votes: " + repr(short) if short else "every 202 stored"
            lines.append(f"  {row.stage.name}: stored after each repeat {stored}: {check}")
        names = sorted(
            {name for s in row.samples for name in s.extra if not name.startswith(COST_KEYS)}
        )
        if (summary := row.stage.summary(row.samples)) is not None:
            lines.append(f"  {row.stage.number} {row.stage.name}: {summary}")
        elif names:
            medians = []
            for name in names:
                value = statistics.median(s.extra[name] for s in row.samples if name in s.extra)
                medians.append(f"{name} {value:.3g}")
            lines.append(f"  {row.stage.name} (medians): " + ", ".join(medians))
        errors = sum(s.socket_errors + s.timeouts for s in row.samples)
        if errors:
            lines.append(f"  {row.stage.name}: {errors} socket errors or timeouts")
    return "\n".join(lines)


def rounds(found: Sequence[Row]) -> str:
    """How many times each stage was measured (the drain, often fewer)."""
    counts = {row.stage.number: len(row.samples) for row in found}
    most = max(counts.values(), default=0)
    fewer = [f"stage {n} {k} time(s)" for n, k in counts.items() if k < most]
    return f"{most} round(s)" + (f" ({', '.join(fewer)})" if fewer else "")


def cost_table(found: Sequence[Row]) -> str:
    """Per process, CPU seconds per 1,000 votes and peak MiB (medians); "" if none."""
    measured = [row for row in found if row.samples and "cpu_s_per_1k.edge" in row.samples[0].extra]
    if not measured:
        return ""
    names = [
        key.removeprefix("cpu_s_per_1k.")
        for key in measured[0].samples[0].extra
        if key.startswith("cpu_s_per_1k.")
    ]
    lines = [("stage", *names, "all")]
    for row in measured:
        cells = [f"{row.stage.number} {row.stage.name}"]
        total = 0.0
        for name in names:
            cpu = median_extra(row.samples, f"cpu_s_per_1k.{name}")
            total += cpu
            cells.append(f"{cpu:.3f} / {median_extra(row.samples, f'peak_mib.{name}'):,.0f}")
        cells.append(f"{total:.3f}")
        lines.append(tuple(cells))
    return (
        "cost by process: CPU seconds per 1,000 votes answered 202 / peak memory MiB "
        "(medians)\n" + columns(lines)
    )


@functools.cache  # once per run, not once per sample written
def _git() -> dict[str, Any]:
    repo = RESULTS_DIR.parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"commit": commit, "dirty": bool(status.strip())}


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (fsync costs differ: ext4, tmpfs...)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if (
            len(parts) >= 3
            and (target + "/").startswith(parts[1].rstrip("/") + "/")
            and len(parts[1]) >= len(best)
        ):
            best, kind = parts[1], parts[2]
    return kind


def results_path(started: datetime, directory: Path) -> Path:
    """Where a run started at `started` keeps its figures."""
    return directory / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"


def document(
    found: Sequence[Row],
    started: datetime,
    settings: dict[str, Any],
    machine: dict[str, Any],
    *,
    complete: bool = True,
) -> dict[str, Any]:
    """The run's figures so far, as bench/results/ keeps them."""
    return {
        "started_at": started.isoformat(),
        "complete": complete,
        "command": [Path(sys.executable).name, "-m", "loadtest.bench", *sys.argv[1:]],
        "git": _git(),
        "settings": settings,
        "machine": machine | {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "stages": [row.to_json() for row in found if row.samples],
    }


def write_json(figures: dict[str, Any], path: Path) -> None:
    """Write `figures` to `path`, replacing it whole: the bench writes after
    every sample, so that a run cut short keeps what it measured, and a file
    is never left half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(figures, indent=2) + "\n")
    os.replace(partial, path)
