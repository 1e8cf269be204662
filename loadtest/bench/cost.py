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
from .stage import Sample


class Cost(PipelineStage):
    number = 7
    name = "cost"
    title = "the pipeline flat out until all is committed: CPU and memory per process"

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
