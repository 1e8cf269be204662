"""Running wrk with ``vote.lua`` and reading what it measured, and what it cost.

wrk (https://github.com/wg/wrk) is a C load generator: far less CPU per
request than any Python client, so on a small machine the server, not the
generator, is what saturates. How much CPU wrk itself used is measured anyway
(from the kernel's accounting of the finished child), so a reader can tell.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from voteflow.children import spawn

from .procs import peak_rss

SCRIPT = Path(__file__).with_name("vote.lua")
# wrk gives up on a request after this long and counts a timeout; long enough
# that the naive baseline's queueing shows as latency, not as errors.
REQUEST_TIMEOUT = "10s"
# Seconds a run with a set number of requests waits for the last answers.
ANSWER_TIMEOUT = 10.0
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
    # By status, when vote.lua counted them (a quota or a ledger); else None.
    shed: int | None = None  # 503
    other: int | None = None  # neither 202 nor 503
    late: int = 0  # paced requests sent more than 10 ms after their slot
    peak_rss_bytes: int = 0  # wrk's own

    @property
    def accepted(self) -> int:
        """Answers 2xx (the servers answer a vote 202 or an error, nothing else)."""
        return self.requests - self.non_2xx

    @property
    def cpu_percent(self) -> float:
        """wrk's CPU use, in percent of one core."""
        return 100.0 * self.cpu_seconds / self.wall_seconds


# How run_each() makes one run of several.
SUMMED = ("requests", "non_2xx", "socket_errors", "timeouts", "late", "peak_rss_bytes")
WORST = ("seconds", "p50_ms", "p95_ms", "p99_ms", "max_ms", "wall_seconds")


@dataclass(frozen=True, slots=True)
class Load:
    """What one wrk run sends, beyond new voters of one poll as fast as it can."""

    rate: float = 0.0  # requests per second in all, on a fixed schedule; 0: unpaced
    total: int = 0  # requests in all, then stop once all are answered; 0: until -d ends
    ledger: Path | None = None  # where the vote_ids answered 202 go, one file per thread
    forwarded: bool = False  # each voter from an address of its own (X-Forwarded-For)
    # Voter tokens, one per line, in a file per thread (<tokens><thread number>):
    # each request carries the next as its Bearer token and names no voter of
    # its own (after the last, the first again).
    tokens: Path | None = None


def run(
    wrk: str,
    url: str,
    *,
    duration: int,
    connections: int,
    threads: int,
    poll_id: str,
    option_ids: list[str],
    load: Load = Load(),
) -> WrkRun:
    """One wrk run of `duration` seconds against ``url + /api/vote``, new voters throughout.

    With `load.total`, wrk stops as soon as each of its threads has every answer
    to its share; `duration` is then only a limit.
    """
    if load.total and load.total % threads:
        raise ValueError(f"{load.total} requests do not split evenly over {threads} threads")
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s"]
    argv += ["--timeout", REQUEST_TIMEOUT, "--latency", "-s", str(SCRIPT), url]
    argv += ["--", secrets.token_hex(4), poll_id, ",".join(option_ids)]
    argv += [
        repr(load.rate / threads),
        str(load.total // threads),
        "-" if load.ledger is None else f"{load.ledger}.",
        "1" if load.forwarded else "0",
        "-" if load.tokens is None else f"{load.tokens}.",
    ]
    # The children's CPU counters grow when a child is reaped; no other child
    # of the bench ends while wrk runs, so the difference is wrk's alone.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = spawn("wrk", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, session=True).popen
    peak = [0]
    watcher = threading.Thread(target=_watch_memory, args=(proc, peak), daemon=True)
    watcher.start()
    try:
        if load.total:
            _stop_when_done(proc, threads, duration + GRACE)
        out, err = proc.communicate(timeout=duration + GRACE)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"wrk did not finish within {duration + GRACE:.0f}s") from None
    finally:
        if proc.poll() is None:  # timed out, or the bench was interrupted
            proc.kill()
            proc.wait()
        watcher.join()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {err.decode(errors='replace')}")
    line = next((x for x in output.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary line:\n{output}\n{err.decode()}")
    summary = json.loads(line.removeprefix("BENCH "))
    counted = summary["accepted"] >= 0
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
        shed=summary["shed"] if counted else None,
        other=summary["other"] if counted else None,
        late=summary["late"],
        peak_rss_bytes=peak[0],
    )


def run_each(wrk: str, urls: list[str], *, connections: int, threads: int, **common: Any) -> WrkRun:
    """One wrk run per URL, at once, the connections and threads split among
    them (each with a ledger file of its own), as one run: answers summed,
    latencies the worst of them."""
    if len(urls) == 1:
        return run(wrk, urls[0], connections=connections, threads=threads, **common)
    load: Load = common.pop("load", Load())
    threads = max(1, threads // len(urls))
    connections = max(threads, connections // len(urls))

    def one(i: int) -> WrkRun:
        ledger = load.ledger and load.ledger.with_name(f"{load.ledger.name}-{i}")
        each = replace(load, ledger=ledger)
        return run(wrk, urls[i], connections=connections, threads=threads, load=each, **common)

    # run() reads wrk's CPU from the reaped children's counters, which the
    # other wrk processes' would cloud: read them around all of them.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ThreadPoolExecutor(len(urls)) as pool:
        runs = list(pool.map(one, range(len(urls))))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = {name: sum(getattr(r, name) for r in runs) for name in SUMMED}
    worst = {name: max(getattr(r, name) for r in runs) for name in WORST}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return WrkRun(**total, **worst, cpu_seconds=cpu)


def ledger(directory: Path) -> list[str]:
    """The vote_ids answered 202 that vote.lua wrote to the ledger files in `directory`."""
    return [vote_id for path in sorted(directory.iterdir()) for vote_id in path.read_text().split()]


def _stop_when_done(proc: subprocess.Popen[bytes], threads: int, timeout: float) -> None:
    """Interrupt wrk once every thread has all its answers, or REQUEST_TIMEOUT
    after the last of them has sent its share: wrk's main thread otherwise
    sleeps out -d, and wrk never gives up on a request whose connection the
    server dropped. SIGINT makes wrk report as usual; what is still unanswered
    is counted as such."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while seen.count(b"BENCH-THREAD-DONE\n") < threads:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                return  # wrk exited (its -d ended first)
            seen += chunk
            if seen.count(b"BENCH-THREAD-SENT\n") == threads:
                deadline = min(deadline, time.monotonic() + ANSWER_TIMEOUT)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)


def _watch_memory(proc: subprocess.Popen[bytes], peak: list[int]) -> None:
    """Keep wrk's peak resident set size (VmHWM) as long as it runs."""
    while proc.poll() is None:
        peak[0] = max(peak[0], peak_rss(proc.pid))
        time.sleep(0.1)
