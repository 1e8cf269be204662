"""Stage 6, the spike: --spike-votes votes as fast as wrk can send them on one
new poll; the shares answered 202, 503 and otherwise, the time until the
last 202 committed, and every 202 of vote.lua's ledger checked by
loadtest.verdict. docs/benchmarks.md (stage 6).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from tempfile import TemporaryDirectory

from . import wrk
from .pipeline import PipelineStage
from .stack import Options, progress
from .stage import Sample, median_extra

# Votes answered and committed per second, for the plan.
COMMITTED_PER_S = 5000.0

# Seconds wrk may run at most: the spike ends when every vote is answered.
LIMIT = 120


class Spike(PipelineStage):
    number = 6
    name = "spike"
    title = "a spike of votes as fast as wrk sends them; then each 202 exactly once in PostgreSQL"

    def round_s(self, options: Options) -> float:
        return options.spike_votes / COMMITTED_PER_S

    def measure(self) -> Sample:
        options = self.bench.options
        votes = options.spike_votes
        poll = self.pipeline.new_poll()
        with TemporaryDirectory(prefix="voteflow-spike-") as directory:
            load = wrk.Load(total=votes, ledger=Path(directory) / "accepted")
            run = self.pipeline.measured(poll, LIMIT, load, options.spike_connections)
            accepted = wrk.ledger(Path(directory))
        exact, line, missing = self.pipeline.exactly_once(poll[0], accepted)
        rows = {row.vote_id: row for row in self.pipeline.committed(poll[0])}
        last_commit = max((rows[v].committed for v in accepted if v in rows), default=run.began)
        sent = run.sent
        answered = sent.accepted + (sent.shed or 0) + (sent.other or 0)
        progress(
            f"spike: {votes:,} offered, {len(accepted):,} answered 202, {sent.shed} 503, "
            f"{sent.other} other, {votes - answered:,} unanswered; exactly once: "
            + ("OK" if exact else f"WRONG: {line}")
        )
        extra = {
            "offered": float(votes),
            "share_202": sent.accepted / votes,
            "share_503": (sent.shed or 0) / votes,
            "share_other": (sent.other or 0) / votes,
            "share_unanswered": (votes - answered) / votes,
            "seconds_to_all_committed": last_commit - run.began,
            "ledger_202": float(len(accepted)),
            "missing_202": float(missing),
            "exactly_once": 1.0 if exact else 0.0,
        }
        return run.sample(sent.accepted / sent.seconds, len(rows), extra)

    def summary(self, samples: list[Sample]) -> str:
        exact = sum(1 for s in samples if s.extra["exactly_once"] == 1.0)
        shares = ", ".join(
            f"{label} {100 * median_extra(samples, f'share_{key}'):.1f}%"
            for key, label in (
                ("202", "202"), ("503", "503"), ("other", "other"), ("unanswered", "no answer"),
            )
        )  # fmt: skip
        p95 = statistics.median(s.p95_ms for s in samples)
        return (
            f"{median_extra(samples, 'offered'):,.0f} votes offered: {shares}; p95 {p95:.0f} "
            f"ms; every 202 committed "
            f"{median_extra(samples, 'seconds_to_all_committed'):.1f} s after the first "
            f"request; each 202 in PostgreSQL exactly once: "
            f"{'OK' if exact == len(samples) else 'WRONG'} in {exact} of {len(samples)} run(s)"
        )
