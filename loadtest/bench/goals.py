"""voteflow's cost goals, each a ratio within one run of the bench, next to its target.

Computed from a run's JSON document (report.document), so that a run kept
from before the goals existed is judged the same way (``--compare``). A goal
whose stages the run did not measure is "not measured", never met.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .report import Document, Figures, by_number, columns, extra, median

# The processes of the pipeline whose CPU a vote costs (stage 7's extras);
# wrk, the load generator, is not one of them.
PIPELINE = ("edge", "worker", "redis", "postgresql")

# A run's stages that measured something, by number (report.by_number).
Stages = dict[int, Figures]
Measure = Callable[[Stages], float | None]


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    target: float
    at_most: bool  # met when the figure is at most the target (else at least)
    unit: str
    measure: Measure

    @property
    def wanted(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.target:g}{self.unit}"

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "not measured"
        met = value <= self.target if self.at_most else value >= self.target
        return "met" if met else "not met"


def own(number: int, name: str) -> Measure:
    """The measure: the median of one of stage `number`'s own figures (Sample.extra)."""
    return lambda stages: extra(stages[number], name) if number in stages else None


def edge_over_ceiling(stages: Stages) -> float | None:
    ratio = stages.get(2, {}).get("ratio")
    return float(ratio["median"]) if ratio and ratio.get("of") == "2/1" else None


def pipeline_cpu_per_1k(figures: Figures) -> float | None:
    """A stage's CPU seconds per 1,000 votes, every process of the pipeline
    together (median over its samples); None if it did not measure them."""
    keys = [f"cpu_s_per_1k.{name}" for name in PIPELINE]
    return median(
        sum(float(s["extra"][key]) for key in keys)
        for s in figures["samples"]
        if all(key in s.get("extra", {}) for key in keys)
    )


def pipeline_cpu_over_bare(stages: Stages) -> float | None:
    """Stage 7's CPU per vote, every process of the pipeline, over the bare
    app's CPU per request (stage 1)."""
    bare = stages.get(1, {}).get("server_cpu_s_per_1k_median")
    pipeline = pipeline_cpu_per_1k(stages[7]) if 7 in stages else None
    return None if not bare or pipeline is None else pipeline / float(bare)


def fanout_votes_answered(stages: Stages) -> float | None:
    """Of the votes offered to the edge while it serves the watchers, the
    share answered 202: the rate reached over the rate offered, and none
    answered otherwise or lost to an error."""
    fanout = stages.get(8)
    offered = fanout and extra(fanout, "offered_per_s")
    if not fanout or not offered:
        return None
    failed = sum(s["non_2xx"] + s["socket_errors"] + s["timeouts"] for s in fanout["samples"])
    return 0.0 if failed else min(1.0, float(fanout["rate_median"]) / offered)


def fanout_votes_p99(stages: Stages) -> float | None:
    return float(stages[8]["latency_ms_median"]["p99"]) if 8 in stages else None


# Issue 14's goals. Stage 8's offered rate is reached when 99% of it is:
# wrk's schedule rounds.
GOALS = (
    Goal("edge over the HTTP ceiling (2/1)", 0.6, False, "", edge_over_ceiling),
    Goal("pipeline CPU per vote over the bare app's (7 all / 1)", 6, True, "x",
         pipeline_cpu_over_bare),
    Goal("live: commit to watcher p99 (8)", 400, True, " ms", own(8, "delay_p99_ms")),
    Goal("live: votes offered meanwhile answered 202 (8)", 0.99, False, "",
         fanout_votes_answered),
    Goal("live: those votes' p99 (8)", 100, True, " ms", fanout_votes_p99),
    Goal("drain over the PostgreSQL ceiling (4)", 0.7, False, "", own(4, "drain_over_ceiling")),
)  # fmt: skip


def judged(document: Document) -> list[dict[str, Any]]:
    """Each goal's figure and verdict, as stored in the JSON under "goals"."""
    stages = by_number(document)
    found = []
    for goal in GOALS:
        value = goal.measure(stages)
        verdict = goal.verdict(value)
        found.append({"goal": goal.name, "value": value, "target": goal.wanted, "verdict": verdict})
    return found


def table(documents: Sequence[Document], headers: Sequence[str] = ("measured",)) -> str:
    """The goals of one run (with their verdicts), or of several side by side."""
    one = len(documents) == 1
    lines = [("goal", *headers, "target", *(["verdict"] if one else []))]
    runs = [judged(document) for document in documents]
    for i, goal in enumerate(GOALS):
        judgements = [run[i] for run in runs]
        values = ["-" if j["value"] is None else f"{j['value']:.3g}{goal.unit}" for j in judgements]
        verdict = [judgements[0]["verdict"]] if one else []
        lines.append((goal.name, *values, goal.wanted, *verdict))
    return columns(lines, left=range(len(lines[0])))
