"""Several edge processes on one port: ``voteflow edge --processes N``.

One edge process is bound by its own CPU, and it uses one core at most (its
event loop runs on one thread), so using a machine's cores takes several
processes. This is a pre-fork supervisor, the way gunicorn runs its workers:

- The supervisor opens the listening socket(s) once, then forks N processes
  that each run the whole edge (uvloop, their own Redis and PostgreSQL pools,
  their own live-tally subscription) and accept connections from that one
  socket. One shared socket rather than one per process with SO_REUSEPORT,
  because: a port already in use fails here, at once, instead of a second
  deployment quietly sharing it; connections waiting to be accepted stay
  queued for the others when a process dies (a SO_REUSEPORT socket's queue
  is reset with its process); and a busy process takes fewer new connections
  than an idle one, where SO_REUSEPORT hands each process its fixed share of
  them however busy it is.
- Each process is told to die with the supervisor (PR_SET_PDEATHSIG, with
  SIGTERM, so that it still finishes the requests in flight).
- SIGTERM or SIGINT to the supervisor goes on to every process as SIGTERM;
  each drains as a lone edge does (ingest.serve); the supervisor waits for
  them, SIGKILLs any still running STOP_TIMEOUT later, and exits 0 when every
  one exited 0.
- A process that exits without being told to is replaced, after a delay that
  doubles with each quick failure of its slot (RESTART_DELAY up to
  MAX_RESTART_DELAY), so that a crash loop does not spin. After MAX_FAILURES
  quick failures in a row the supervisor stops the others and exits 1, for
  whatever runs it to see. A process that ran STABLE_SECONDS had started fine.
- Metrics: the supervisor gives the processes a directory of its own for
  prometheus-client's multiprocess mode and removes it when it exits (see
  ingest.metrics). When a process exits, the files of its gauges go (a gauge
  describes a live process); those of its counters and histograms stay, so
  that sums never go back.

Why not gunicorn with aiohttp's GunicornUVLoopWebWorker: that worker makes
its own sites from ``runner.server``, so the connection cap and the deadline
for a first request head (ingest.serve: the edge's defence against floods and
slowloris) would sit nowhere, short of overriding the worker's private
``_run`` or replacing the runner's server; it respawns a failing process at
once rather than after a growing delay; and it would add a dependency to the
edge for what the module below does in some 250 lines. Signals, the shared
socket and the metrics directory work the same way in both.

The supervisor waits for signals with sigtimedwait, all three blocked: it
needs no event loop, and no signal handler of its own can run in a child
between the fork and the child's own set-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import NoReturn

from aiohttp import web

from voteflow.children import die_with_parent
from voteflow.settings import Settings

from .serve import BACKLOG, SHUTDOWN_TIMEOUT, serve

log = logging.getLogger(__name__)

# prometheus-client's switch to multiprocess mode (ingest.metrics.MULTIPROC_DIR).
# Not imported from there: importing prometheus-client before this is set
# would fix single-process mode for every process forked from here.
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Seconds a process gets after SIGTERM, beyond the SHUTDOWN_TIMEOUT of its
# requests, to close its pools and exit; then it is SIGKILLed.
STOP_TIMEOUT = SHUTDOWN_TIMEOUT + 5.0
# The first restart after a quick failure waits this long, each next one twice
# as long as the last, up to the most.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 10.0
# Quick failures in a row of one slot after which the supervisor gives up:
# with the delays above, about 8 s of a process that cannot start.
MAX_FAILURES = 5
# A process that ran this long had started fine: its exit is a first failure.
STABLE_SECONDS = 30.0
# Seconds between two readings of a process's PostgreSQL pool for its gauges.
# A lone edge reads its pool when it is scraped; here a scrape reaches one
# process and reports the others' last readings, which this keeps recent.
POOL_GAUGE_INTERVAL = 1.0
SIGNALS = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM}


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` names, as asyncio's
    create_server opens them (SO_REUSEADDR, IPv6 sockets IPv6 only)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def supervise(settings: Settings, processes: int) -> int:
    """Run ``processes`` edge processes on settings.host:settings.port until
    SIGINT or SIGTERM; the exit status (0: all stopped cleanly)."""
    settings.require_urls()  # once, here, rather than in a crash loop of every process
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before its multiprocess directory was set"
        )
    try:
        sockets = listen(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", settings.host, settings.port, exc)
        return 1
    metrics_dir = Path(tempfile.mkdtemp(prefix="voteflow-edge-metrics-"))
    os.environ[MULTIPROC_DIR] = str(metrics_dir)
    try:
        # Imported once here, so that each process forks with it loaded.
        from .app import create_app

        supervisor = _Supervisor(settings, create_app, sockets, metrics_dir, processes)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            return supervisor.run(old_mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        del os.environ[MULTIPROC_DIR]


@dataclass
class _Slot:
    """One of the N places for an edge process."""

    pid: int = 0  # 0: none runs
    started: float = 0.0
    failures: int = 0  # quick failures in a row
    restart_at: float | None = None  # when the next process starts, while none runs


@dataclass
class _Supervisor:
    settings: Settings
    create_app: Callable[[Settings], web.Application]
    sockets: list[socket.socket]
    metrics_dir: Path
    processes: int
    slots: list[_Slot] = field(init=False)

    def __post_init__(self) -> None:
        self.slots = [_Slot() for _ in range(self.processes)]

    def run(self, child_mask: set[int | signal.Signals]) -> int:
        addresses = ", ".join(_address(sock) for sock in self.sockets)
        log.info("edge supervisor on %s: starting %d processes", addresses, self.processes)
        for slot in self.slots:
            self._start(slot, child_mask)
        while True:
            due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
            if due:
                info = signal.sigtimedwait(SIGNALS, max(min(due) - time.monotonic(), 0.0))
            else:
                info = signal.sigwaitinfo(SIGNALS)
            if info is not None and info.si_signo != signal.SIGCHLD:
                log.info("%s: stopping the edge processes", signal.Signals(info.si_signo).name)
                return 0 if self._stop() else 1
            for slot, pid, status in self._reap():
                if not self._schedule_restart(slot, pid, status):
                    self._stop()
                    return 1
            now = time.monotonic()
            for slot in self.slots:
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._start(slot, child_mask)

    def _start(self, slot: _Slot, child_mask: set[int | signal.Signals]) -> None:
        preexec = die_with_parent(signal.SIGTERM)  # notes this pid before the fork
        pid = os.fork()
        if pid == 0:
            _child(self.settings, self.create_app, self.sockets, child_mask, preexec)
        slot.pid, slot.started, slot.restart_at = pid, time.monotonic(), None
        log.info("edge process %d started", pid)

    def _running(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.pid]

    def _reap(self) -> Iterator[tuple[_Slot, int, int]]:
        """Each process that has exited: its slot, pid and exit status (-N: killed
        by signal N)."""
        while self._running():
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            slot = next((slot for slot in self.slots if slot.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            for path in self.metrics_dir.glob(f"gauge_*_{pid}.db"):
                path.unlink(missing_ok=True)
            yield slot, pid, os.waitstatus_to_exitcode(status)

    def _schedule_restart(self, slot: _Slot, pid: int, status: int) -> bool:
        """When the slot's next process starts; False if it failed too often."""
        now = time.monotonic()
        ran = now - slot.started
        slot.failures = 1 if ran >= STABLE_SECONDS else slot.failures + 1
        if slot.failures >= MAX_FAILURES:
            log.error(
                "edge process %d exited with status %d after %.1f s: %d processes in a row "
                "exited within %.0f s of their start; giving up",
                pid, status, ran, slot.failures, STABLE_SECONDS,
            )  # fmt: skip
            return False
        delay = min(RESTART_DELAY * 2 ** (slot.failures - 1), MAX_RESTART_DELAY)
        slot.restart_at = now + delay
        log.warning(
            "edge process %d exited with status %d after %.1f s; a new one starts in %.1f s",
            pid, status, ran, delay,
        )  # fmt: skip
        return True

    def _stop(self) -> bool:
        """SIGTERM every process and wait until all have exited, SIGKILLing any
        left after STOP_TIMEOUT; True if every one exited 0."""
        for slot in self.slots:
            slot.restart_at = None
        for slot in self._running():
            os.kill(slot.pid, signal.SIGTERM)
        clean = True
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            for _, pid, status in self._reap():
                if status != 0:
                    log.error("edge process %d exited with status %d as it stopped", pid, status)
                    clean = False
            left = deadline - time.monotonic()
            if not self._running():
                log.info("every edge process has stopped")
                return clean
            if left <= 0:
                for slot in self._running():
                    log.error(
                        "edge process %d still ran %.0f s after SIGTERM: killed",
                        slot.pid, STOP_TIMEOUT,
                    )  # fmt: skip
                    os.kill(slot.pid, signal.SIGKILL)
                deadline = time.monotonic() + STOP_TIMEOUT
                continue
            signal.sigtimedwait(SIGNALS, left)  # a SIGCHLD; a repeated stop signal changes nothing


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}" if sock.family == socket.AF_INET else f"http://[{host}]:{port}"


class _Stopped(Exception):
    pass


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def _child(
    settings: Settings,
    create_app: Callable[[Settings], web.Application],
    sockets: Sequence[socket.socket],
    mask: set[int | signal.Signals],
    preexec: Callable[[], None] | None,
) -> NoReturn:
    """An edge process, forked: run the edge until told to stop, then exit
    without ever returning into the supervisor's code."""
    status = 1
    try:
        # Until its event loop takes them over, a stop signal ends the process at once.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_stopped)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if preexec is not None:
            preexec()
        app = create_app(settings)
        app.cleanup_ctx.append(_pool_gauges)
        serve(app, settings, sockets)
        status = 0
    except _Stopped:
        status = 0
    except BaseException:
        log.exception("edge process %d failed", os.getpid())
    finally:
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


async def _pool_gauges(app: web.Application) -> AsyncIterator[None]:
    """Keep this process's PostgreSQL pool gauges recent (POOL_GAUGE_INTERVAL)."""
    from .app import EDGE, METRICS

    async def refresh() -> None:
        while True:
            app[METRICS].observe_pool(app[EDGE].pool)
            await asyncio.sleep(POOL_GAUGE_INTERVAL)

    task = asyncio.create_task(refresh())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
