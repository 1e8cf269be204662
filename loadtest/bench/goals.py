"""voteflow's cost goals, each a ratio within one run of the bench, next to its target.

Computed from a run's JSON document (report.document), so that a run kept
from before the goals existed is judged the same way (``--compare``). A goal
whose stages the run did not measure is "not measured", never met.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .report import columns

Document = dict[str, Any]

# The processes of the pipeline whose CPU a vote costs (stage 7's extras);
# wrk, the load generator, is not one of them.
PIPELINE = ("edge", "worker", "redis", "postgresql")


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    target: float
    at_most: bool  # met when the figure is at most the target (else at least)
    unit: str
    measure: Callable[[Document], float | None]

    def judge(self, document: Document) -> tuple[float | None, str]:
        value = self.measure(document)
        if value is None:
            return None, "not measured"
        met = value <= self.target if self.at_most else value >= self.target
        return value, "met" if met else "not met"

    @property
    def wanted(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.target:g}{self.unit}"


def _stage(document: Document, number: int) -> dict[str, Any] | None:
    for stage in document.get("stages", []):
        if stage["stage"] == number and stage.get("samples"):
            return stage  # type: ignore[no-any-return]
    return None


def _extra(stage: dict[str, Any], name: str) -> float | None:
    values = [float(s["extra"][name]) for s in stage["samples"] if name in s.get("extra", {})]
    return statistics.median(values) if values else None


def edge_over_ceiling(document: Document) -> float | None:
    edge = _stage(document, 2)
    ratio = edge and edge.get("ratio")
    return None if not ratio or ratio.get("of") != "2/1" else float(ratio["median"])


def pipeline_cpu_per_1k(stage: dict[str, Any]) -> float | None:
    """A stage's CPU seconds per 1,000 votes, every process of the pipeline
    together (median over its samples); None if it did not measure them."""
    per_sample = [
        sum(float(s["extra"][f"cpu_s_per_1k.{name}"]) for name in PIPELINE)
        for s in stage["samples"]
        if all(f"cpu_s_per_1k.{name}" in s.get("extra", {}) for name in PIPELINE)
    ]
    return statistics.median(per_sample) if per_sample else None


def pipeline_cpu_over_bare(document: Document) -> float | None:
    """Stage 7's CPU per vote, every process of the pipeline, over the bare
    app's CPU per request (stage 1)."""
    bare, cost = _stage(document, 1), _stage(document, 7)
    if bare is None or cost is None or not bare["server_cpu_s_per_1k_median"]:
        return None
    pipeline = pipeline_cpu_per_1k(cost)
    return None if pipeline is None else pipeline / float(bare["server_cpu_s_per_1k_median"])


def watcher_delay_p99(document: Document) -> float | None:
    fanout = _stage(document, 8)
    return None if fanout is None else _extra(fanout, "delay_p99_ms")


def fanout_votes_answered(document: Document) -> float | None:
    """Of the votes offered to the edge while it serves the watchers, the
    share answered 202: the rate reached over the rate offered, and none
    answered otherwise or lost to an error."""
    fanout = _stage(document, 8)
    offered = fanout and _extra(fanout, "offered_per_s")
    if fanout is None or not offered:
        return None
    failed = sum(s["non_2xx"] + s["socket_errors"] + s["timeouts"] for s in fanout["samples"])
    return 0.0 if failed else min(1.0, float(fanout["rate_median"]) / float(offered))


def fanout_votes_p99(document: Document) -> float | None:
    fanout = _stage(document, 8)
    return None if fanout is None else float(fanout["latency_ms_median"]["p99"])


def drain_over_ceiling(document: Document) -> float | None:
    drain = _stage(document, 4)
    return None if drain is None else _extra(drain, "drain_over_ceiling")


# Issue 14's goals. Stage 8's offered rate is reached when 99% of it is:
# wrk's schedule rounds.
GOALS = (
    Goal("edge over the HTTP ceiling (2/1)", 0.6, False, "", edge_over_ceiling),
    Goal("pipeline CPU per vote over the bare app's (7 all / 1)", 6, True, "x",
         pipeline_cpu_over_bare),
    Goal("live: commit to watcher p99 (8)", 400, True, " ms", watcher_delay_p99),
    Goal("live: votes offered meanwhile answered 202 (8)", 0.99, False, "",
         fanout_votes_answered),
    Goal("live: those votes' p99 (8)", 100, True, " ms", fanout_votes_p99),
    Goal("drain over the PostgreSQL ceiling (4)", 0.7, False, "", drain_over_ceiling),
)  # fmt: skip


def judged(document: Document) -> list[dict[str, Any]]:
    """Each goal's figure and verdict, as stored in the JSON under "goals"."""
    found = []
    for goal in GOALS:
        value, verdict = goal.judge(document)
        found.append({"goal": goal.name, "value": value, "target": goal.wanted, "verdict": verdict})
    return found


def table(documents: list[Document], headers: list[str] | None = None) -> str:
    """The goals of one run, or of several side by side."""
    headers = headers or ["measured"]
    lines = [("goal", *headers, "target", *(["verdict"] if len(documents) == 1 else []))]
    for goal in GOALS:
        cells = [goal.name]
        verdicts = []
        for document in documents:
            value, verdict = goal.judge(document)
            cells.append("-" if value is None else f"{value:.3g}{goal.unit}")
            verdicts.append(verdict)
        cells.append(goal.wanted)
        if len(documents) == 1:
            cells.append(verdicts[0])
        lines.append(tuple(cells))
    return columns(lines, left=range(len(lines[0])))
