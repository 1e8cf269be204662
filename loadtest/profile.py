"""What the Locust run is measured against: the load shape, the thresholds, the ledger.

No Locust import here (importing Locust monkey-patches the process with
gevent), so the driver and the tests use these as they are.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

ENV_SCALE = "VOTEFLOW_LOADTEST_SCALE"
ENV_TIME_SCALE = "VOTEFLOW_LOADTEST_TIME_SCALE"
ENV_LEDGER = "VOTEFLOW_LOADTEST_LEDGER"

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


# The reference profile: 3.5 minutes, 50,000 users at the top.
REFERENCE_STAGES: tuple[Stage, ...] = (
    Stage(30, 1_000),
    Stage(60, 10_000),
    Stage(30, 50_000),
    Stage(60, 50_000),
    Stage(30, 0),
)


@dataclass(frozen=True, slots=True)
class Profile:
    """The stages scaled in users and in time; ``tick(t)`` is what a
    LoadTestShape returns at run time t.

    Each stage asks Locust for its end target at the spawn rate that reaches
    it when the stage ends, so the ramps are linear, like k6 stages.
    ``max_run_time`` (Locust's --run-time) ends the run whatever the stages say.
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
    """What makes the run fail. Shares are fractions (0.05 is 5%). 503 answers
    to votes (shed, or Redis away) are not failures up to ``max_shed`` of the
    vote requests."""

    max_p95_ms: float = 500.0
    max_failures: float = 0.05
    max_shed: float = 0.01

    # Each limit's environment variable and what its --flag means: the
    # locustfile makes its options from this table.
    OPTIONS: ClassVar[dict[str, tuple[str, str]]] = {
        "max_p95_ms": ("VOTEFLOW_LOADTEST_MAX_P95_MS", "p95 response time limit in ms"),
        "max_failures": ("VOTEFLOW_LOADTEST_MAX_FAILURES", "share of requests that may fail"),
        "max_shed": ("VOTEFLOW_LOADTEST_MAX_SHED", "share of votes that may be answered 503"),
    }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Thresholds:
        env = dict(os.environ) if env is None else env
        limits: dict[str, float] = {}
        for name, (variable, _) in cls.OPTIONS.items():
            raw = env.get(variable, "").strip()
            if raw:
                try:
                    limits[name] = float(raw)
                except ValueError:
                    raise ValueError(f"{variable} must be a number, got {raw!r}") from None
        return cls(**limits)

    def check(
        self, *, requests: int, failures: int, p95_ms: float, votes: int, shed: int
    ) -> list[str]:
        """One line per threshold, each starting with PASS or FAIL."""
        failure_share = failures / requests if requests else 1.0
        shed_share = shed / votes if votes else 0.0
        verdicts = (
            (
                requests > 0 and p95_ms <= self.max_p95_ms,
                f"p95 {p95_ms:,.0f} ms (limit {self.max_p95_ms:,.0f} ms), {requests:,} requests",
            ),
            (
                requests > 0 and failure_share <= self.max_failures,
                f"failures {failures:,} = {failure_share:.2%} (limit {self.max_failures:.2%}; "
                "expected 4xx and 503 sheds are not failures)",
            ),
            (
                shed_share <= self.max_shed,
                f"503 shed {shed:,} of {votes:,} votes = {shed_share:.2%} "
                f"(limit {self.max_shed:.2%})",
            ),
        )
        return [f"{'PASS' if ok else 'FAIL'} {text}" for ok, text in verdicts]


class Ledger:
    """The votes this process saw answered 202: one JSON object per line,
    ``{"vote_id", "poll_id", "body"}``, in a file of its own in ``directory``.

    Line-buffered, so a Locust worker that dies loses no line it wrote. The
    file is opened at the first line: a process that sends no vote (a Locust
    master) leaves no file.
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
