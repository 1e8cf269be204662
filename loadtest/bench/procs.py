"""The bench's child processes, and the CPU time and memory they use (psutil;
the peak resident set from /proc, which psutil does not read).

Every child runs in a session of its own, so a Ctrl-C in the terminal reaches
only the bench, which then stops its children in order; and the kernel
signals a child if the bench dies without doing so (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import psutil

from voteflow.children import die_with_parent

# Seconds a child gets to stop after SIGTERM before it is killed; the edge
# needs about one (it closes its pools).
STOP_TIMEOUT = 15.0


def popen(
    argv: Sequence[str],
    *,
    stdout: int | IO[bytes],
    stderr: int | IO[bytes],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """subprocess.Popen in a session of its own, signalled when the bench dies."""
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )


class Child:
    """A long-running process of the bench (an app or the edge), its output in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self._proc = popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def check_alive(self) -> None:
        if self._proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self._proc.returncode}\n{self.log_tail()}"
            )

    def wait_http(self, url: str, timeout: float = 30.0) -> None:
        """Return once `url` answers 200; fail if the process exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with (
                suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=1) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {url} did not answer in {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL to its whole session's group after `timeout`. Idempotent."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        with suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return f"last lines of {self.log_path}:\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a live process, all its threads."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        raise RuntimeError(f"process {pid} is gone") from None
    return float(times.user + times.system)


def tree_pids(root: int) -> set[int]:
    """`root` and every live process below it (PostgreSQL's backends)."""
    try:
        return {root, *(child.pid for child in psutil.Process(root).children(recursive=True))}
    except psutil.Error:
        return {root}


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of `root` and of every live process below it."""
    found = {}
    for pid in tree_pids(root):
        with suppress(RuntimeError):
            found[pid] = cpu_seconds(pid)
    return found


def tree_cpu_used(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds a process tree used between two tree_cpu() readings (of processes
    alive at the second; one that ended in between is not counted)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def rss(pid: int) -> int:
    """Bytes: the process's resident set now; 0 if gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def peak_rss(pid: int) -> int:
    """Bytes: the largest resident set the process has had (VmHWM of
    /proc/<pid>/status); 0 if gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return 1024 * int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> None:
    """Start the process's VmHWM afresh from its present resident set (see
    proc_pid_clear_refs(5)); where that is not allowed, it stays the peak since
    the process started."""
    with suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def tree_pss(root: int) -> int:
    """Bytes: the proportional set size of `root` and every process below it.

    PostgreSQL's processes share its buffers; summing their resident sets would
    count those once per process, summing PSS counts each page once.
    """
    total = 0
    for pid in tree_pids(root):
        with suppress(psutil.Error):
            total += int(psutil.Process(pid).memory_full_info().pss)
    return total
