"""Stage 8, fan-out: --watchers SSE streams of one poll on the one edge process
(held open by watchers.py in a child process) while votes flow: the edge's
memory per watcher and the delay from commit to watcher. docs/benchmarks.md
(stage 8).
"""

from __future__ import annotations

import subprocess
import sys
import time

import orjson

from voteflow.children import spawn

from . import wrk
from .pipeline import PipelineStage
from .procs import cpu_seconds, rss
from .stack import Options, progress
from .stage import Sample, median_extra

# Watchers that open their streams per second, for the plan.
CONNECTED_PER_S = 2000.0


class FanOut(PipelineStage):
    number = 8
    name = "fan-out"
    title = "SSE watchers of one poll on one edge while votes flow: memory and delay"

    def round_s(self, options: Options) -> float:
        # The streams open, a second to settle, the votes, a second for the last update.
        return options.watchers / CONNECTED_PER_S + 2 + options.duration

    def measure(self) -> Sample:
        options = self.bench.options
        poll = self.pipeline.new_poll()
        before = rss(self.pipeline.edges[0].pid)
        argv = [sys.executable, "-m", "loadtest.bench.watchers", self.pipeline.url, poll[0]]
        argv.append(str(options.watchers))
        with spawn(
            "watchers", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, session=True,
        ) as watchers:  # fmt: skip
            child = watchers.popen
            assert child.stdout is not None
            line = child.stdout.readline().decode()
            if not line.startswith("CONNECTED"):
                raise RuntimeError(f"the watchers did not all connect: {line!r}")
            time.sleep(1.0)  # let the edge settle its buffers
            after = rss(self.pipeline.edges[0].pid)
            progress(f"fan-out: {options.watchers:,} watchers open; votes for {options.duration}s")
            watchers_cpu = cpu_seconds(child.pid)
            load = wrk.Load(rate=options.fanout_rate)
            # The last update's way to the watchers, within the measured time.
            run = self.pipeline.measured(poll, options.duration, load, then=lambda: time.sleep(1))
            watchers_cpu = cpu_seconds(child.pid) - watchers_cpu
            out, _ = child.communicate(input=b"", timeout=60)
        report = orjson.loads(out.splitlines()[-1])
        stored = self.pipeline.total_ballots(poll[0])
        extra = {
            "watchers": float(options.watchers),
            "offered_per_s": float(options.fanout_rate),
            "watchers_open_at_end": float(report["still_open"]),
            "edge_kib_per_watcher": (after - before) / 1024 / options.watchers,
            "updates_received": float(report["updates"]),
            "updates_per_watcher": report["updates"] / options.watchers,
            "watchers_cpu_percent": 100 * watchers_cpu / run.wall,
        }
        extra |= {f"delay_{p}_ms": value for p, value in report["delay_ms"].items()}
        return run.sample(run.sent.accepted / run.sent.seconds, stored, extra)

    def summary(self, samples: list[Sample]) -> str:
        delay = "/".join(f"{median_extra(samples, f'delay_p{p}_ms'):.0f}" for p in (50, 95, 99))
        return (
            f"{median_extra(samples, 'watchers'):,.0f} SSE watchers "
            f"({median_extra(samples, 'watchers_open_at_end'):,.0f} still open at the end), "
            f"edge memory {median_extra(samples, 'edge_kib_per_watcher'):.1f} KiB per watcher; "
            f"{median_extra(samples, 'updates_per_watcher'):.1f} updates per watcher, delay "
            f"from commit to watcher p50/p95/p99 {delay} ms; the watchers' process used "
            f"{median_extra(samples, 'watchers_cpu_percent'):.0f}% of a core"
        )
