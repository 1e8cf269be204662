"""The one harness for voteflow's child processes: `voteflow up`'s worker and
edge, the bench's servers under test and its load generators, the load test's
stack and Locust, and the tests' edges and workers.

Each child is a psutil.Popen, never outlives its parent (PR_SET_PDEATHSIG: a
parent killed without a chance to stop its children must not leave them
running), and is stopped by `stop_all`:
SIGTERM, then SIGKILL after a timeout. The edge's pre-fork supervisor and the
private servers use `die_with_parent` alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypeVar, cast

import psutil

# prctl(2) option: the signal a child gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def die_with_parent(death_signal: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to signal the child when we die (Linux only).

    subprocess calls it after switching to `user=`/`group=`, which matters: a
    credential change clears the setting.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return preexec


Stream = int | IO[bytes] | None


class Child:
    """One child process, named, its output in `log` if it has one.

    A child of `session` leads a session of its own: a Ctrl-C in the terminal
    reaches only the parent, which stops it in order, and the SIGKILL at its
    end goes to its whole group (an edge's processes under their supervisor).
    """

    def __init__(
        self,
        name: str,
        popen: subprocess.Popen[bytes],
        log: Path | None = None,
        session: bool = False,
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log
        self.session = session

    @property
    def pid(self) -> int:
        return int(self.popen.pid)

    def check_alive(self) -> None:
        """Raise RuntimeError, with the end of its log, if it has exited."""
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"the {self.name} exited with status {self.popen.returncode}\n{self.log_tail()}"
            )

    def wait_http(self, url: str, timeout: float = 30.0, beside: Iterable[Child] = ()) -> None:
        """Return once `url` answers 200; fail if it (or one `beside` it) exits,
        or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not answers(url):
            for child in (self, *beside):
                child.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name}: {url} did not answer in {timeout:.0f}s")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path} (the {self.name}, pid {self.pid}) ---\n{tail}"

    def stop(self, timeout: float | None = None) -> bool:
        """As stop_all; True if it had to be killed."""
        return bool(stop_all([self], STOP_TIMEOUT if timeout is None else timeout))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log: Path | None = None,
    session: bool = False,
    stdin: Stream = subprocess.DEVNULL,
    stdout: Stream = None,
    stderr: Stream = None,
) -> Child:
    """Start a child (a psutil.Popen, signalled if we die), its output in `log`
    (else as `stdout` and `stderr` say)."""
    with contextlib.ExitStack() as files:
        if log is not None:
            stdout = files.enter_context(log.open("wb"))
            stderr = subprocess.STDOUT
        popen = psutil.Popen(
            list(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=session,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
    # psutil's stubs do not say that its Popen is a subprocess.Popen.
    return Child(name, cast("subprocess.Popen[bytes]", popen), log, session)


C = TypeVar("C", bound=Child)

# Seconds a child gets to stop after SIGTERM by default: a worker gives its
# consumers 20 s to finish their batches, an edge its requests 10 s; both
# need far less.
STOP_TIMEOUT = 25.0


def answers(url: str) -> bool:
    """Whether `url` answers 200 within a second."""
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)
    return False


def stop_all(children: Iterable[C], timeout: float = STOP_TIMEOUT) -> list[C]:
    """SIGTERM to every child still running, SIGKILL to those that outlive
    `timeout` (and to what is left of a child's own session); every one reaped.
    Returns the children that had to be killed. Idempotent."""
    children = list(children)
    running = [child for child in children if child.popen.poll() is None]
    for child in running:
        with contextlib.suppress(ProcessLookupError):
            child.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = []
    for child in running:
        try:
            child.popen.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            killed.append(child)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            if child.session:
                os.killpg(child.pid, signal.SIGKILL)
            elif child in killed:
                child.popen.kill()
        child.popen.wait()
    return killed


@contextlib.contextmanager
def children(timeout: float = STOP_TIMEOUT) -> Iterator[list[Child]]:
    """A list for the children started inside; all stopped (stop_all) on the way out."""
    started: list[Child] = []
    try:
        yield started
    finally:
        stop_all(started, timeout)
