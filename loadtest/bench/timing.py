"""How long a run of the bench will take, said before it starts, and how long it took.

Each stage plans its own time from the run's options (Stage.plan). The plans'
constants were read off this kind of machine (2 cores); a busy machine takes
longer, so the bench keeps what each stage really took next to its plan, in
the JSON and at the end of its output, where a stale plan shows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .stage import Plan, Stage


@dataclass(slots=True)
class Took:
    """A stage's seconds, as they went."""

    start: float = 0.0
    warm_up: float = 0.0
    rounds: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.start + self.warm_up + sum(self.rounds)


@contextmanager
def timed(into: Took, part: Literal["start", "warm_up", "round"]) -> Iterator[None]:
    """Add the seconds of the block to `into`'s start or warm-up, or append a round."""
    began = time.monotonic()
    try:
        yield
    finally:
        seconds = time.monotonic() - began
        if part == "round":
            into.rounds.append(seconds)
        else:
            setattr(into, part, getattr(into, part) + seconds)


def minutes(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def plan_table(rows: Sequence[tuple[Stage, Plan]]) -> str:
    """The plan, one line per stage and the total, before the run starts."""
    lines = [
        f"  {stage.label:<27} start {minutes(plan.start):>6}, warm-up {minutes(plan.warm_up):>5}, "
        f"{plan.rounds} x {minutes(plan.round):>6} = {minutes(plan.total):>6}"
        for stage, plan in rows
    ]
    total = sum(plan.total for _, plan in rows)
    return "\n".join([*lines, f"  {'all stages':<27} about {minutes(total)}"])


def took_table(rows: Sequence[tuple[Stage, Plan, Took]]) -> str:
    """What each stage took next to its plan, after the run."""
    lines = [(stage.label, took.total, plan.total) for stage, plan, took in rows]
    lines.append(("all stages", sum(t for _, t, _ in lines), sum(p for _, _, p in lines)))
    return "\n".join(
        f"  {label:<27} took {minutes(took):>6} (planned {minutes(plan)})"
        for label, took, plan in lines
    )


def to_json(plan: Plan, took: Took) -> dict[str, Any]:
    return {
        "planned_s": asdict(plan) | {"total": plan.total},
        "took_s": asdict(took) | {"total": took.total},
    }
