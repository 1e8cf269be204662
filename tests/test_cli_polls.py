"""The ``voteflow`` command as an operator uses it: its version, and the poll
commands against a real edge over its HTTP API."""

from __future__ import annotations

import asyncio
import os
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND_TIMEOUT = 30.0


def _env(**extra: str) -> dict[str, str]:
    # An operator's shell: no VOTEFLOW_* but what the test sets.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEFLOW_")}
    return env | extra


async def voteflow(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m voteflow ARGS``: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "voteflow", *args),
        env=_env() if env is None else env,
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(COMMAND_TIMEOUT):
        stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def test_version_prints_the_installed_version() -> None:
    assert await voteflow("--version") == (0, f"voteflow {metadata.version('voteflow')}\n", "")
