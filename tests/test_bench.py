"""`make bench` (python -m loadtest.bench) as a smoke run: short, but every stage for real.

It needs wrk (`apt-get install wrk`); without it the smoke run is skipped and
only the bench's own refusal is checked.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Private servers, three apps, three 1 s warm-ups and three 2 s runs: ~20 s.
SMOKE_TIMEOUT = 100.0
# Not a voteflow setting (the bench passes no VOTEFLOW_* variable on): only to
# find the processes of the run, which all inherit it.
MARK = "BENCH_SMOKE_MARK"


def _processes_marked(entry: str) -> list[str]:
    """Live processes whose environment holds `entry` ("NAME=value"): every
    process the bench started inherits it (the servers, the edge, the apps, wrk)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if entry.encode() not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(f"{proc.name}: {command}")
    return found


def test_bench_measures_three_stages_and_leaves_no_process(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk): the bench's load generator")
    token = secrets.token_hex(8)
    env = {**os.environ, MARK: token}
    argv = [sys.executable, "-m", "loadtest.bench", "--stages", "1,2,3", "--repeats", "1"]
    argv += ["--duration", "2", "--connections", "8", "--results-dir", str(tmp_path)]
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT
    )
    assert _processes_marked(f"{MARK}={token}") == []
    assert done.returncode == 0, done.stdout + done.stderr
    assert "p50/p95/p99 ms" in done.stdout
    for row in ("1 http-ceiling", "2 edge", "3 naive", "2/1 = ", "2/3 = "):
        assert row in done.stdout, done.stdout

    (written,) = tmp_path.glob("*.json")
    stages = json.loads(written.read_text())["stages"]
    assert [stage["stage"] for stage in stages] == [1, 2, 3]
    for stage in stages:
        assert len(stage["samples"]) == 1
        assert stage["rate_median"] > 0, stage
        assert stage["non_2xx_total"] == 0, stage
    for stage in stages[1:]:
        # Every vote answered 202 is in storage (a few more: wrk stops waiting
        # for its last requests, and the server still serves them).
        (sample,) = stage["samples"]
        assert sample["stored"] >= sample["accepted"], sample


def test_bench_without_wrk_says_how_to_install_it() -> None:
    env = {**os.environ, "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "wrk is not installed" in done.stderr
    assert "apt-get install wrk" in done.stderr


def test_bench_drain_stage_with_a_small_backlog(tmp_path: Path) -> None:
    # Stage 4 runs no wrk, so it runs without it too.
    token = secrets.token_hex(8)
    env = {**os.environ, MARK: token}
    argv = [sys.executable, "-m", "loadtest.bench", "--stages", "4", "--drain-votes", "20000"]
    argv += ["--repeats", "1", "--results-dir", str(tmp_path)]
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT
    )
    assert _processes_marked(f"{MARK}={token}") == []
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 drain" in done.stdout
    assert "total_ballots_minus_distinct_voters 0" in done.stdout, done.stdout
    assert "distinct voters 18,000: OK" in done.stderr, done.stderr

    (written,) = tmp_path.glob("*.json")
    (stage,) = json.loads(written.read_text())["stages"]
    assert stage["stage"] == 4
    (sample,) = stage["samples"]
    assert stage["rate_median"] > 0, stage
    assert sample["stored"] == sample["accepted"] == 20000, sample
    assert sample["extra"]["ceiling_rows_per_s"] > 0, sample
    assert sample["extra"]["drain_over_ceiling"] > 0, sample
    assert sample["extra"]["total_ballots_minus_distinct_voters"] == 0, sample
