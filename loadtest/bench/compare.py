"""``python -m loadtest.bench --compare A.json B.json``: two kept runs side by side.

Rates and CPU per 1,000 requests of runs made at different times differ
with the machine's load as much as with the code: the within-run ratios
(each run's 2/1, say) and the goals are what compare fairly; B/A of the
absolute figures is shown beside them as a hint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import goals
from .report import columns


def load(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or "stages" not in document:
        raise ValueError(f"{path} is not a result of python -m loadtest.bench")
    return document


def _by_number(document: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {stage["stage"]: stage for stage in document["stages"] if stage.get("samples")}


def _figure(stage: dict[str, Any] | None, name: str) -> float | None:
    return None if stage is None or stage.get(name) is None else float(stage[name])


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def _over(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or a == 0 else f"{b / a:.2f}"


def _ratio(stage: dict[str, Any] | None) -> str:
    ratio = stage and stage.get("ratio")
    return f"{ratio['of']} = {ratio['median']:.2f}" if ratio else "-"


def describe(name: str, path: Path, document: dict[str, Any]) -> str:
    git = document.get("git") or {}
    state = "" if document.get("complete", True) else ", cut short (complete: false)"
    commit = git.get("commit", "?")[:10] + (" (dirty)" if git.get("dirty") else "")
    return f"{name}: {path} started {document.get('started_at', '?')}, commit {commit}{state}"


def compare(path_a: Path, path_b: Path) -> str:
    a, b = load(path_a), load(path_b)
    stages_a, stages_b = _by_number(a), _by_number(b)
    lines: list[tuple[str, ...]] = [
        ("stage", "rate A", "rate B", "B/A", "CPU s/1k A", "CPU s/1k B", "B/A",
         "ratio A", "ratio B"),
    ]  # fmt: skip
    for number in sorted(stages_a.keys() | stages_b.keys()):
        sa, sb = stages_a.get(number), stages_b.get(number)
        name = (sa or sb or {}).get("name", "?")
        rate_a, rate_b = _figure(sa, "rate_median"), _figure(sb, "rate_median")
        cpu_a = _figure(sa, "server_cpu_s_per_1k_median")
        cpu_b = _figure(sb, "server_cpu_s_per_1k_median")
        lines.append(
            (
                f"{number} {name}",
                _cell(rate_a, ",.0f"),
                _cell(rate_b, ",.0f"),
                _over(rate_a, rate_b),
                _cell(cpu_a, ".3f"),
                _cell(cpu_b, ".3f"),
                _over(cpu_a, cpu_b),
                _ratio(sa),
                _ratio(sb),
            )
        )
        if (
            sa
            and sb
            and (pa := goals.pipeline_cpu_per_1k(sa))
            and (pb := goals.pipeline_cpu_per_1k(sb))
        ):
            lines.append(
                (f"  {number} pipeline, all", "", "", "", f"{pa:.3f}", f"{pb:.3f}",
                 _over(pa, pb), "", "")
            )  # fmt: skip
    return "\n\n".join(
        [
            describe("A", path_a, a) + "\n" + describe("B", path_b, b),
            columns(lines, left=(0, 7, 8)),
            goals.table([a, b], ["A", "B"]),
        ]
    )
