"""What the Locust run is measured against: the load shape, the thresholds, the ledger.

Plain Python, no Locust import (importing Locust monkey-patches the process
with gevent), so the test suite and the driver can use it as they are.

- :class:`Profile`: the reference stages (30 s ramp to 1,000 users, 60 s to
  10,000, a 30 s spike to 50,000, 60 s hold, 30 s down to 0), scaled in users
  (``VOTEFLOW_LOADTEST_SCALE``) and in time (``VOTEFLOW_LOADTEST_TIME_SCALE``).
- :class:`Thresholds`: p95, failure share and 503 share that decide the exit code.
- :class:`Ledger`: one JSON-lines file per Locust process, one line per 202.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ENV_SCALE = "VOTEFLOW_LOADTEST_SCALE"
ENV_TIME_SCALE = "VOTEFLOW_LOADTEST_TIME_SCALE"
ENV_LEDGER = "VOTEFLOW_LOADTEST_LEDGER"
ENV_MAX_P95_MS = "VOTEFLOW_LOADTEST_MAX_P95_MS"
ENV_MAX_FAILURES = "VOTEFLOW_LOADTEST_MAX_FAILURES"
ENV_MAX_SHED = "VOTEFLOW_LOADTEST_MAX_SHED"

DEFAULT_LEDGER = Path("loadtest/results/ledger")

# Locust's statistics name each kind of request; the thresholds find the vote
# requests and the shed ones among them by these names.
VOTE = "POST /api/vote"
SHED = f"{VOTE} (503 shed)"
INVALID = f"{VOTE} (invalid"  # ballots sent to be refused: not votes for the 503 share


@dataclass(frozen=True, slots=True)
class Stage:
    duration: float  # seconds, unscaled
    users: int  # target at the end of the stage, unscaled


# The reference profile of issue 5: 3.5 minutes, 50,000 users at the top.
REFERENCE_STAGES: tuple[Stage, ...] = (
    Stage(30, 1_000),
    Stage(60, 10_000),
    Stage(30, 50_000),
    Stage(60, 50_000),
    Stage(30, 0),
)


@dataclass(frozen=True, slots=True)
class Profile:
    """The stages, scaled: ``tick(t)`` is what a LoadTestShape returns at run time t.

    Each stage asks Locust for its end target at the spawn rate that reaches
    it when the stage ends (Locust's ``start()`` ramps at that rate and returns
    when there), so the ramps are linear, like k6 stages. ``max_run_time``, when
    set, ends the run early whatever the stages say: a hard bound.
    """

    stages: tuple[Stage, ...] = REFERENCE_STAGES
    scale: float = 1.0
    time_scale: float = 1.0
    max_run_time: float | None = None

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"the user scale must be > 0, got {self.scale}")
        if not self.time_scale > 0:
            raise ValueError(f"the time scale must be > 0, got {self.time_scale}")

    def users(self, unscaled: int) -> int:
        """A stage target scaled; at least one user for a target above zero."""
        return 0 if unscaled == 0 else max(1, round(unscaled * self.scale))

    @property
    def duration(self) -> float:
        """Seconds from the first tick to the end of the last stage."""
        return sum(stage.duration for stage in self.stages) * self.time_scale

    @property
    def peak(self) -> int:
        return max(self.users(stage.users) for stage in self.stages)

    def tick(self, run_time: float) -> tuple[int, float] | None:
        """(users, spawn rate per second) at ``run_time`` seconds, or None: stop."""
        if self.max_run_time is not None and run_time >= self.max_run_time:
            return None
        end = 0.0
        previous = 0
        for stage in self.stages:
            duration = stage.duration * self.time_scale
            end += duration
            target = self.users(stage.users)
            if run_time < end:
                rate = abs(target - previous) / duration if duration > 0 else float(target)
                return target, max(rate, 1.0)
            previous = target
        return None


@dataclass(frozen=True)
class Thresholds:
    """What makes the run fail. Shares are fractions (0.05 is 5%)."""

    max_p95_ms: float = 500.0
    max_failures: float = 0.05
    # 503 answers to votes (shed or Redis away) are not failures up to this
    # share of vote requests; beyond it the run fails.
    max_shed: float = 0.01

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Thresholds:
        env = dict(os.environ) if env is None else env
        default = cls()
        return cls(
            max_p95_ms=_number(env, ENV_MAX_P95_MS, default.max_p95_ms),
            max_failures=_number(env, ENV_MAX_FAILURES, default.max_failures),
            max_shed=_number(env, ENV_MAX_SHED, default.max_shed),
        )

    def check(
        self, *, requests: int, failures: int, p95_ms: float, votes: int, shed: int
    ) -> list[str]:
        """One line per threshold, each starting with PASS or FAIL."""
        failure_share = failures / requests if requests else 1.0
        shed_share = shed / votes if votes else 0.0
        return [
            _verdict(
                requests > 0 and p95_ms <= self.max_p95_ms,
                f"p95 {p95_ms:,.0f} ms (limit {self.max_p95_ms:,.0f} ms), {requests:,} requests",
            ),
            _verdict(
                requests > 0 and failure_share <= self.max_failures,
                f"failures {failures:,} = {failure_share:.2%} (limit {self.max_failures:.2%}; "
                "expected 4xx and 503 sheds are not failures)",
            ),
            _verdict(
                shed_share <= self.max_shed,
                f"503 shed {shed:,} of {votes:,} votes = {shed_share:.2%} "
                f"(limit {self.max_shed:.2%})",
            ),
        ]


def _verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {text}"


def _number(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


class Ledger:
    """The votes this process saw answered 202: one JSON object per line,
    ``{"vote_id", "poll_id", "body"}``, in a file of its own in ``directory``.

    Line-buffered: a line is written out when the 202 is counted, so a Locust
    worker that dies loses no line it wrote. The file is opened at the first
    line, so processes that send no vote (a Locust master) leave no file.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / (
            f"ledger-{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
        )
        self._file: IO[str] | None = None

    def record(self, vote_id: str, poll_id: str, body: dict[str, Any]) -> None:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1, encoding="utf-8")
        line = {"vote_id": vote_id, "poll_id": poll_id, "body": body}
        self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
