"""Running wrk with ``vote.lua`` and reading what it measured, and what it cost.

wrk (https://github.com/wg/wrk) is a C load generator: far less CPU per
request than any Python client, so on a small machine the server, not the
generator, is what saturates. How much CPU wrk itself used is measured anyway
(from the kernel's accounting of the finished child), so a reader can tell.
"""

from __future__ import annotations

import json
import resource
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import popen

SCRIPT = Path(__file__).with_name("vote.lua")
# wrk gives up on a request after this long and counts a timeout; long enough
# that the naive baseline's queueing shows as latency, not as errors.
REQUEST_TIMEOUT = "10s"
# Seconds wrk may take beyond its duration (start-up, its last requests).
GRACE = 30.0

MISSING = """\
wrk is not installed (looked for `wrk` on PATH); the bench drives its load with it.
Install it, then run the bench again:
  Debian/Ubuntu:  sudo apt-get install wrk
  macOS:          brew install wrk
  elsewhere:      build it from https://github.com/wg/wrk
The bench does not install it itself: that needs root."""


def find() -> str | None:
    return shutil.which("wrk")


def version(wrk: str) -> str:
    done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
    lines = (done.stdout + done.stderr).splitlines()
    return lines[0].strip() if lines else "unknown"


@dataclass(frozen=True, slots=True)
class WrkRun:
    requests: int  # responses received
    non_2xx: int  # responses with a status over 399
    socket_errors: int  # connect, read and write errors
    timeouts: int  # requests without an answer within REQUEST_TIMEOUT
    seconds: float  # the load's duration, as wrk measured it
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    cpu_seconds: float  # wrk's own, user plus system, all threads
    wall_seconds: float  # wrk's whole run, start-up included

    @property
    def accepted(self) -> int:
        """Answers 2xx (the servers answer a vote 202 or an error, nothing else)."""
        return self.requests - self.non_2xx

    @property
    def cpu_percent(self) -> float:
        """wrk's CPU use, in percent of one core."""
        return 100.0 * self.cpu_seconds / self.wall_seconds


def run(
    wrk: str,
    url: str,
    *,
    duration: int,
    connections: int,
    threads: int,
    poll_id: str,
    option_ids: list[str],
) -> WrkRun:
    """One wrk run of `duration` seconds against ``url + /api/vote``, new voters throughout."""
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s"]
    argv += ["--timeout", REQUEST_TIMEOUT, "--latency", "-s", str(SCRIPT), url]
    argv += ["--", secrets.token_hex(4), poll_id, ",".join(option_ids)]
    # The children's CPU counters grow when a child is reaped; no other child
    # of the bench ends while wrk runs, so the difference is wrk's alone.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=duration + GRACE)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not finish within {duration + GRACE:.0f}s") from None
    finally:
        if proc.poll() is None:  # timed out, or the bench was interrupted
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {err.decode(errors='replace')}")
    line = next((x for x in output.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary line:\n{output}\n{err.decode()}")
    summary = json.loads(line.removeprefix("BENCH "))
    return WrkRun(
        requests=summary["requests"],
        non_2xx=summary["status"],
        socket_errors=summary["connect"] + summary["read"] + summary["write"],
        timeouts=summary["timeout"],
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p95_ms=summary["p95_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        max_ms=summary["max_us"] / 1000,
        cpu_seconds=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        wall_seconds=wall,
    )
