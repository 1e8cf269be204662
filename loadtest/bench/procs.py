"""The CPU time and memory of the bench's child processes (psutil; the peak
resident set from /proc, which psutil does not read). The children themselves
are voteflow.children's."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

import psutil


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


def tree_cpu(*roots: int) -> dict[int, float]:
    """CPU seconds of each of `roots` and of every live process below them."""
    found = {}
    for pid in set().union(*map(tree_pids, roots)):
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
