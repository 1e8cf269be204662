"""Stage 5, end to end at a steady load: a fixed offered rate (--steady-rate,
else half of stage 2's in this run) sent on wrk's schedule, and per vote the
lag from the edge's receipt to its commit and to the first SSE update that
counts it, both read on this machine's clock. docs/benchmarks.md (stage 5).
"""

from __future__ import annotations

import math
import statistics

from . import wrk
from .pipeline import LiveWatcher, PipelineStage, percentiles
from .stack import Options, progress
from .stage import Sample, median_extra

# Seconds of latency the connections absorb before the schedule slips.
HEADROOM = 0.1


class Steady(PipelineStage):
    number = 5
    name = "steady"
    title = "the pipeline end to end at a fixed offered rate; lag to commit and to SSE"

    rate: float = 0.0

    def round_s(self, options: Options) -> float:
        return float(options.steady_duration)

    def _offered_rate(self) -> float:
        options = self.bench.options
        if options.steady_rate:
            return options.steady_rate
        if edge := self.bench.samples.get(2):
            return statistics.median(s.rate for s in edge) / 2
        progress("steady: no stage 2 in this run; measuring the pipeline at full speed")
        run = self.pipeline.send(self.pipeline.new_poll(), max(options.warmup, 3))
        self.pipeline.wait_committed()
        return run.accepted / run.seconds / 2

    def _connections(self) -> int:
        """Enough that a request waits for a free connection only if answers take
        over 100 ms on average (Little's law), never fewer than --connections."""
        return max(self.bench.options.connections, math.ceil(self.rate * HEADROOM))

    def measure(self) -> Sample:
        if not self.rate:
            self.rate = self._offered_rate()
            progress(f"steady: offering {self.rate:,.0f} votes/s")
        duration = self.bench.options.steady_duration
        poll = self.pipeline.new_poll()
        watcher = LiveWatcher(self.pipeline.url, poll[0])

        def shown() -> None:  # the last update, within the measured time
            if not watcher.wait_for(self.pipeline.total_ballots(poll[0])):
                progress("steady: the live stream never showed every ballot")

        try:
            load = wrk.Load(rate=self.rate)
            run = self.pipeline.measured(poll, duration, load, self._connections(), shown)
        finally:
            watcher.close()
        votes = self.pipeline.committed(poll[0])
        commit_lags = [v.committed - v.received for v in votes]
        live_lags, missed = watcher.lags(votes)
        extra = {"offered_per_s": self.rate, "late_sends": float(run.sent.late)}
        for name, lags in (("commit_lag", commit_lags), ("sse_lag", live_lags)):
            for point, value in zip((50, 95, 99), percentiles(lags), strict=True):
                extra[f"{name}_p{point}_ms"] = 1000 * value
        extra["sse_updates"] = float(len(watcher.events))
        extra["votes_no_sse_update"] = float(missed)
        return run.sample(run.sent.accepted / run.sent.seconds, len(votes), extra)

    def summary(self, samples: list[Sample]) -> str:
        def lags(name: str) -> str:
            return "/".join(f"{median_extra(samples, f'{name}_p{p}_ms'):.0f}" for p in (50, 95, 99))

        unseen = sum(s.extra["votes_no_sse_update"] for s in samples)
        return (
            f"offered {median_extra(samples, 'offered_per_s'):,.0f} votes/s (late sends, "
            f"median {median_extra(samples, 'late_sends'):.0f}); lag p50/p95/p99 ms from the "
            f"edge's receipt: to commit {lags('commit_lag')}, to the SSE update "
            f"{lags('sse_lag')}; votes no SSE update counted: {unseen:.0f}"
        )
