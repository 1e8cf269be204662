"""`make bench` (python -m loadtest.bench) as a smoke run: short, but every stage for real.

It needs wrk (`apt-get install wrk`); without it the smoke run is skipped and
only the bench's own refusal is checked.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench import cli
from tests.support import REPO, processes_with_env

# Private servers, three apps, three 1 s warm-ups and three 2 s runs: ~20 s.
SMOKE_TIMEOUT = 100.0
# Not a voteflow setting (the bench passes no VOTEFLOW_* variable on): only to
# find the processes of the run, which all inherit it.
MARK = "BENCH_SMOKE_MARK"


def run_bench(
    tmp_path: Path, *options: str, timeout: float = SMOKE_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run the bench with `options`, its results in `tmp_path`; it must exit 0
    and leave no process of its own behind. Skips without wrk."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk): the bench's load generator")
    token = secrets.token_hex(8)
    env = {**os.environ, MARK: token}
    argv = [sys.executable, "-m", "loadtest.bench", *options, "--results-dir", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert processes_with_env(MARK, token) == []
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_bench_measures_the_first_stages_and_leaves_no_process(tmp_path: Path) -> None:
    done = run_bench(
        tmp_path,
        "--stages",
        "1,2,3,12,13",
        "--repeats",
        "1",
        "--duration",
        "2",
        "--connections",
        "8",
    )
    assert "p50/p95/p99 ms" in done.stdout
    for row in (
        "1 http-ceiling",
        "2 edge",
        "3 naive",
        "12 edge-2-processes",
        "13 edge-voter-tokens",
        "2/1 = ",
        "2/3 = ",
        "12/2 = ",
        "13/2 = ",
    ):
        assert row in done.stdout, done.stdout

    assert "goals (ratios within this run)" in done.stdout, done.stdout
    # How long each stage will take, said before it starts; what it took, after.
    plan = done.stderr.split("bench: the plan", 1)[1].split("bench: starting", 1)[0]
    for label in ("1 http-ceiling", "2 edge", "3 naive", "12 edge-2-processes", "all stages"):
        assert label in plan, done.stderr
    assert "took" in done.stdout.split("time (planned", 1)[1], done.stdout
    (written,) = tmp_path.glob("*.json")
    document = json.loads(written.read_text())
    assert document["complete"] is True
    for number in ("1", "2", "3", "12", "13"):
        timed = document["timing"][number]
        assert timed["planned_s"]["total"] > 0, timed
        assert len(timed["took_s"]["rounds"]) == 1 and timed["took_s"]["total"] > 0, timed
    # Only the edge's goal is measured by these stages; the others say so.
    verdicts = {goal["goal"]: goal for goal in document["goals"]}
    edge_goal = verdicts["edge over the HTTP ceiling (2/1)"]
    assert edge_goal["value"] > 0 and edge_goal["verdict"] in {"met", "not met"}
    assert verdicts["drain over the PostgreSQL ceiling (4)"]["verdict"] == "not measured"
    stages = document["stages"]
    assert [stage["stage"] for stage in stages] == [1, 2, 3, 12, 13]
    for stage in stages:
        assert len(stage["samples"]) == 1
        assert stage["rate_median"] > 0, stage
        assert stage["non_2xx_total"] == 0, stage
    for stage in stages[1:]:
        # Every vote answered 202 is in storage (a few more: wrk stops waiting
        # for its last requests, and the server still serves them).
        (sample,) = stage["samples"]
        assert sample["stored"] >= sample["accepted"], sample


def test_quick_run_is_one_short_round_unless_told_otherwise() -> None:
    quick = cli.parse(["--quick"])
    full = cli.parse([])
    assert (quick.repeats, full.repeats) == (1, 3)
    assert quick.duration < full.duration and quick.drain_votes < full.drain_votes
    assert quick.watchers < full.watchers and quick.spike_votes < full.spike_votes
    # An option given wins over either size.
    assert cli.parse(["--quick", "--repeats", "2", "--watchers", "50"]).repeats == 2
    assert cli.parse(["--quick", "--watchers", "50"]).watchers == 50


def test_the_plans_of_a_full_and_a_quick_run_fit_their_promise() -> None:
    # What `make bench` and `--quick` promise (about 10 and 3 minutes), by the
    # stages' own plans; what a run really took is in its JSON, next to them.
    def planned(argv: list[str]) -> float:
        args = cli.parse(argv)
        options = cli.options_of(args, wrk_path="wrk")
        started: set[str] = set()
        return sum(cli.STAGES[n]().plan(options, started).total for n in args.stages)

    assert planned([]) <= 10 * 60
    assert planned(["--quick"]) <= 3.5 * 60
    assert planned(["--quick"]) < planned([]) / 2


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
    assert processes_with_env(MARK, token) == []
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


def test_bench_end_to_end_stages_measure_lag_spike_and_cost(tmp_path: Path) -> None:
    done = run_bench(
        tmp_path,
        *("--stages", "5,6,7,8", "--repeats", "1", "--duration", "2", "--connections", "8"),
        *("--steady-rate", "300", "--steady-duration", "3"),
        *("--spike-votes", "2000", "--spike-connections", "100"),
        *("--watchers", "300", "--fanout-rate", "100"),
    )
    for text in (
        "5 steady",
        "6 spike",
        "7 cost",
        "8 fan-out",
        "to the SSE update",
        "exactly once: OK in 1",
    ):
        assert text in done.stdout, done.stdout
    assert "cost by process" in done.stdout, done.stdout

    (written,) = tmp_path.glob("*.json")
    document = json.loads(written.read_text())
    steady, spike, cost, fanout = document["stages"]
    # Stages 1 and 4 were not run: the goals that need them are not measured;
    # stage 8's are, whatever this small run's figures.
    verdicts = {goal["goal"]: goal["verdict"] for goal in document["goals"]}
    assert verdicts["pipeline CPU per vote over the bare app's (7 all / 1)"] == "not measured"
    assert verdicts["live: commit to watcher p99 (8)"] in {"met", "not met"}
    assert verdicts["live: votes offered meanwhile answered 202 (8)"] in {"met", "not met"}
    (sample,) = steady["samples"]
    extra = sample["extra"]
    # Paced: about 300 votes/s for 3 s were offered, not as many as wrk could send.
    assert 800 <= sample["requests"] <= 1000, sample
    # Every 202 committed (a few more: wrk stops waiting for its last answers).
    assert sample["stored"] >= sample["accepted"], sample
    assert extra["votes_no_sse_update"] == 0, extra
    for point in (50, 95, 99):
        # A tally is published after its commit: no vote reaches a dashboard first.
        assert 0 < extra[f"commit_lag_p{point}_ms"] <= extra[f"sse_lag_p{point}_ms"], extra

    (sample,) = spike["samples"]
    extra = sample["extra"]
    assert extra["offered"] == 2000
    assert extra["share_other"] == 0 and extra["share_unanswered"] == 0, extra
    assert extra["share_202"] + extra["share_503"] == 1, extra
    assert extra["ledger_202"] == sample["accepted"] > 0, extra
    assert extra["missing_202"] == 0 and extra["exactly_once"] == 1, extra
    assert extra["seconds_to_all_committed"] > 0, extra

    (sample,) = cost["samples"]
    for process in ("edge", "worker", "redis", "postgresql", "wrk"):
        assert sample["extra"][f"cpu_s_per_1k.{process}"] > 0, sample["extra"]
        assert sample["extra"][f"peak_mib.{process}"] > 1, sample["extra"]
    assert sample["stored"] >= sample["accepted"] > 0, sample

    (sample,) = fanout["samples"]
    extra = sample["extra"]
    assert extra["watchers"] == extra["watchers_open_at_end"] == 300, extra
    # Every watcher got updates while the votes flowed, each after its commit.
    assert extra["updates_per_watcher"] >= 1, extra
    assert 0 < extra["delay_p50_ms"] <= extra["delay_p99_ms"], extra


def test_live_lag_is_counted_from_the_first_update_that_counts_each_vote() -> None:
    from loadtest.bench.pipeline import Committed, LiveWatcher, percentiles

    watcher = LiveWatcher.__new__(LiveWatcher)
    # Two batches: transaction 7 (2 votes) committed at 10.0, then 8 (1 vote).
    votes = [
        Committed("b", received=9.5, committed=10.2, xid=8),
        Committed("a1", received=9.0, committed=10.0, xid=7),
        Committed("a2", received=9.8, committed=10.0, xid=7),
    ]
    # The first update shows the first batch, a later one both.
    watcher.events = [(10.1, 2), (10.3, 3)]
    lags, missed = watcher.lags(votes)
    assert missed == 0
    assert sorted(round(x, 6) for x in lags) == [0.3, 0.8, 1.1]
    # An update that never came: the second batch is counted as unseen.
    watcher.events = [(10.1, 2)]
    assert watcher.lags(votes)[1] == 1
    assert percentiles([float(n) for n in range(1, 101)]) == [50.0, 95.0, 99.0]


def test_an_interrupted_bench_keeps_what_it_measured(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk): the bench's load generator")
    token = secrets.token_hex(8)
    argv = [sys.executable, "-m", "loadtest.bench", "--stages", "1", "--repeats", "50"]
    argv += ["--duration", "1", "--connections", "8", "--results-dir", str(tmp_path)]
    bench = subprocess.Popen(
        argv, cwd=REPO, env={**os.environ, MARK: token}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + SMOKE_TIMEOUT
        while not list(tmp_path.glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        bench.send_signal(signal.SIGINT)
        _, err = bench.communicate(timeout=60)
    finally:
        bench.kill()
    assert bench.returncode == 130, err
    assert processes_with_env(MARK, token) == []
    (written,) = tmp_path.glob("*.json")
    assert str(written) in err, err
    document = json.loads(written.read_text())
    assert document["complete"] is False
    (stage,) = document["stages"]
    assert 1 <= len(stage["samples"]) < 50 and stage["rate_median"] > 0, stage


def _run(stages: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    return {"started_at": "2026-12-03T00:00:00+00:00", "settings": settings, "stages": stages}


def _stage(number: int, rate: float, cpu: float, **fields: Any) -> dict[str, Any]:
    sample = {"non_2xx": 0, "socket_errors": 0, "timeouts": 0, "extra": fields.pop("extra", {})}
    return {
        "stage": number, "name": f"s{number}", "rate_median": rate,
        "server_cpu_s_per_1k_median": cpu, "latency_ms_median": {"p99": 5.0},
        "ratio": None, "samples": [sample], **fields,
    }  # fmt: skip


def test_goals_are_met_not_met_or_not_measured() -> None:
    from loadtest.bench.goals import judged

    pipeline = {f"cpu_s_per_1k.{p}": 0.1 for p in ("edge", "worker", "redis", "postgresql")}
    run = _run(
        [
            _stage(1, 10_000, 0.05),
            _stage(2, 7_000, 0.1, ratio={"of": "2/1", "median": 0.7}),
            _stage(7, 3_000, 0.2, extra=pipeline | {"cpu_s_per_1k.wrk": 9.0}),
            _stage(8, 150, 0.3, extra={"delay_p99_ms": 250.0, "offered_per_s": 200.0}),
        ]
    )
    verdicts = {goal["goal"]: (goal["value"], goal["verdict"]) for goal in judged(run)}
    assert verdicts["edge over the HTTP ceiling (2/1)"] == (0.7, "met")
    # 0.4 s per 1,000 in the pipeline (wrk is not part of it) over the bare 0.05.
    value, verdict = verdicts["pipeline CPU per vote over the bare app's (7 all / 1)"]
    assert round(value, 6) == 8 and verdict == "not met"
    assert verdicts["live: commit to watcher p99 (8)"] == (250.0, "met")
    # 150 of the 200 votes/s offered were answered.
    assert verdicts["live: votes offered meanwhile answered 202 (8)"] == (0.75, "not met")
    assert verdicts["live: those votes' p99 (8)"] == (5.0, "met")
    assert verdicts["drain over the PostgreSQL ceiling (4)"] == (None, "not measured")


def test_compare_prints_two_runs_side_by_side(tmp_path: Path) -> None:
    older = _run(
        [_stage(1, 10_000, 0.05), _stage(2, 3_000, 0.15, ratio={"of": "2/1", "median": 0.3})]
    )
    newer = _run(
        [_stage(1, 10_000, 0.05), _stage(2, 6_000, 0.12, ratio={"of": "2/1", "median": 0.6})]
    )
    newer["complete"] = False
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(older))  # written before runs said "complete"
    b.write_text(json.dumps(newer))
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--compare", str(a), str(b)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(str(b) in line and "cut short" in line for line in lines), done.stdout
    (edge,) = [line for line in lines if line.startswith("2 s2")]
    assert edge.split()[2:9] == ["3,000", "6,000", "2.00", "0.150", "0.120", "0.80", "2/1"]
    (goal,) = [line for line in lines if line.startswith("edge over the HTTP ceiling")]
    assert goal.split()[-4:] == ["0.3", "0.6", ">=", "0.6"]


def test_compare_refuses_what_is_not_a_bench_result(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--compare", str(other), str(other)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "not a result of python -m loadtest.bench" in done.stderr
