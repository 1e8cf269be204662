"""``python -m loadtest.bench --compare A.json B.json``: two kept runs side by side.

Rates and CPU per 1,000 requests of runs made at different times differ
with the machine's load as much as with the code: the within-run ratios
(each run's 2/1, say) and the goals are what compare fairly; B/A of the
absolute figures is shown beside them as a hint.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import goals
from .report import Document, Figures, by_number, columns, ratio_cell

CPU = "server_cpu_s_per_1k_median"


def load(path: Path) -> Document:
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or "stages" not in document:
        raise ValueError(f"{path} is not a result of python -m loadtest.bench")
    return document


def _figure(figures: Figures | None, name: str) -> float | None:
    return None if figures is None or figures.get(name) is None else float(figures[name])


def _side_by_side(a: float | None, b: float | None, form: str) -> tuple[str, str, str]:
    """A figure of runs A and B, and B/A."""
    cells = ["-" if value is None else format(value, form) for value in (a, b)]
    over = "-" if a is None or b is None or a == 0 else f"{b / a:.2f}"
    return cells[0], cells[1], over


def describe(name: str, path: Path, document: Document) -> str:
    git = document.get("git") or {}
    state = "" if document.get("complete", True) else ", cut short (complete: false)"
    commit = git.get("commit", "?")[:10] + (" (dirty)" if git.get("dirty") else "")
    return f"{name}: {path} started {document.get('started_at', '?')}, commit {commit}{state}"


def compare(path_a: Path, path_b: Path) -> str:
    a, b = load(path_a), load(path_b)
    stages_a, stages_b = by_number(a), by_number(b)
    lines: list[tuple[str, ...]] = [
        ("stage", "rate A", "rate B", "B/A", "CPU s/1k A", "CPU s/1k B", "B/A",
         "ratio A", "ratio B"),
    ]  # fmt: skip
    for number in sorted(stages_a.keys() | stages_b.keys()):
        sa, sb = stages_a.get(number), stages_b.get(number)
        rates = _side_by_side(_figure(sa, "rate_median"), _figure(sb, "rate_median"), ",.0f")
        cpus = _side_by_side(_figure(sa, CPU), _figure(sb, CPU), ".3f")
        name = (sa or sb or {}).get("name", "?")
        lines.append((f"{number} {name}", *rates, *cpus, ratio_cell(sa), ratio_cell(sb)))
        pa, pb = (None if s is None else goals.pipeline_cpu_per_1k(s) for s in (sa, sb))
        if pa and pb:
            pipeline = _side_by_side(pa, pb, ".3f")
            lines.append((f"  {number} pipeline, all", "", "", "", *pipeline, "", ""))
    return "\n\n".join(
        [
            describe("A", path_a, a) + "\n" + describe("B", path_b, b),
            columns(lines, left=(0, 7, 8)),
            goals.table([a, b], ["A", "B"]),
        ]
    )
