"""The suite stops on Ctrl-C and SIGTERM, and leaves nothing running, even
when whatever started it ignored those signals (`make test &`, nohup)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, processes_with_env

# A test that waits, on the fixtures that start the private servers.
WAITING_TEST = """
import asyncio
from pathlib import Path


async def test_waits(settings, redis_client):
    Path({started!r}).touch()
    await asyncio.sleep(60)
"""


def _ignoring_both() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.setpgrp()  # a process group of its own, as a shell gives a job


@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGINT, "0"), (signal.SIGTERM, "0"), (signal.SIGINT, "2")],
    ids=["ctrl-c", "sigterm", "ctrl-c-xdist"],
)
def test_the_suite_stops_on_a_signal_its_starter_ignored(
    signum: signal.Signals, workers: str, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    (tmp_path / "test_waiting.py").write_text(WAITING_TEST.format(started=str(started)))
    mark = secrets.token_hex(8)
    env = os.environ | {"VOTEFLOW_TEST_MARK": mark}
    for name in ("VOTEFLOW_TEST_POSTGRES_URL", "VOTEFLOW_TEST_REDIS_URL"):
        env.pop(name, None)  # its own private servers, to see them stop
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-c", "pyproject.toml", "-p", "tests.conftest",
         "-p", "no:cacheprovider",
         "-n", workers, f"--basetemp={tmp_path / 'run'}", str(tmp_path / "test_waiting.py")],
        cwd=REPO, env=env, preexec_fn=_ignoring_both,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert run.poll() is None, run.communicate()[0].decode()
            assert time.monotonic() < deadline, "the waiting test did not start"
            time.sleep(0.1)
        assert processes_with_env("VOTEFLOW_TEST_MARK", mark)  # pytest and its servers
        # Ctrl-C reaches the terminal's whole foreground job; SIGTERM, pytest.
        if signum == signal.SIGINT:
            os.killpg(run.pid, signum)
        else:
            run.send_signal(signum)
        output, _ = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 2, output.decode()  # pytest's "interrupted"
    assert "KeyboardInterrupt" in output.decode()
    time.sleep(0.5)  # the servers' last exits
    assert processes_with_env("VOTEFLOW_TEST_MARK", mark) == []
