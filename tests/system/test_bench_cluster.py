"""`make bench`'s Redis Cluster stages (9-11) as a smoke run: one short repeat
each, on clusters of their own, every 202 checked in storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.system.test_bench import run_bench

# Two clusters (6 and 3 nodes), two PostgreSQL servers, 5 edges and 3
# workers, then six 1 s warm-ups and five 2 s runs: about 50 s.
SMOKE_TIMEOUT = 180.0
PROCESS_GROUPS = ("edge", "worker", "redis", "postgresql", "wrk")


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_bench_cluster_stages_measure_replica_confirmation_and_cost(tmp_path: Path) -> None:
    done = run_bench(
        tmp_path,
        *("--stages", "9,10,11", "--repeats", "1", "--duration", "2", "--connections", "8"),
        timeout=SMOKE_TIMEOUT,
    )
    for text in (
        "9 cluster-edge",
        "10 cluster-edge-replicated",
        "11 cluster-cost",
        "10/9 = ",
        "p50 latency over stage 9's",
        "1 edge + 1 worker",
        "2 edges + 2 workers",
    ):
        assert text in done.stdout, done.stdout
    assert done.stdout.count("OK in 1 of 1") == 2, done.stdout

    (written,) = tmp_path.glob("*.json")
    unconfirmed, confirmed, cost = json.loads(written.read_text())["stages"]
    assert [unconfirmed["stage"], confirmed["stage"], cost["stage"]] == [9, 10, 11]
    for stage in (unconfirmed, confirmed):
        (sample,) = stage["samples"]
        assert stage["non_2xx_total"] == 0, stage
        # Every 202 is a stream entry (a few more: wrk stops waiting for its
        # last requests, and the edge still appends them).
        assert sample["stored"] >= sample["accepted"] > 0, sample
        # Every node's CPU is counted, replicas included.
        assert sample["store_cpu_seconds"] > 0, sample
        assert sample["extra"]["pipeline_ms"] > 0, sample
    assert confirmed["ratio"]["of"] == "10/9" and confirmed["ratio"]["median"] > 0
    assert confirmed["samples"][0]["extra"]["p50_ratio"] > 0

    (sample,) = cost["samples"]
    extra = sample["extra"]
    assert sample["stored"] >= sample["accepted"] > 0, sample
    for shape in ("1x1", "2x2"):
        assert extra[f"{shape}.votes_per_s"] > 0, extra
        assert extra[f"{shape}.exactly_once"] == 1 and extra[f"{shape}.missing_202"] == 0, extra
        assert extra[f"{shape}.non_2xx"] == 0, extra
        for group in PROCESS_GROUPS:
            assert extra[f"{shape}.cpu_s_per_1k.{group}"] > 0, (shape, group, extra)
            assert extra[f"{shape}.peak_mib.{group}"] > 1, (shape, group, extra)
    # The row is the 1 + 1 shape, under the names the cost table reads.
    assert extra["cpu_s_per_1k.edge"] == extra["1x1.cpu_s_per_1k.edge"]
    assert "cost by process" in done.stdout
