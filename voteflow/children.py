"""Child processes that do not outlive their parent.

Shared by the edge's pre-fork supervisor, the private servers of development
and tests, and the bench: a parent killed without a chance to stop its
children (SIGKILL, a crash) must not leave them running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

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
