"""Stage 7, the cost: what each process spends on a vote when the pipeline runs
flat out. wrk sends new votes as fast as it can for --duration seconds; the
stage ends when the last of them is committed. Its rate is votes committed per
second over that whole time, and for each process (edge, worker, Redis, every
PostgreSQL process, wrk) it reports CPU seconds per 1,000 votes and its peak
memory (pipeline.Meter says how each is read).
"""

from __future__ import annotations

import time

from .pipeline import PipelineStage
from .stack import Options
from .stage import Sample

# A round's seconds over its --duration, for the plan: the worker commits the
# edge's backlog after wrk stops.
DRAIN_AFTER = 1.2


class Cost(PipelineStage):
    number = 7
    name = "cost"
    title = "the pipeline flat out until all is committed: CPU and memory per process"

    def round_s(self, options: Options) -> float:
        # The worker commits the edge's backlog after wrk stops.
        return options.duration * DRAIN_AFTER

    def measure(self) -> Sample:
        poll = self.pipeline.new_poll()
        self.pipeline.rewrite_aof()
        started = time.monotonic()
        with self.pipeline.meter() as meter:
            run = self.send(poll, self.bench.options.duration)
            self.pipeline.wait_committed()
        wall = time.monotonic() - started
        stored = self.pipeline.total_ballots(poll[0])
        return self.sample(run, meter, stored / wall, wall, stored)
