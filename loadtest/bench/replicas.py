"""Stages 9 and 10, what a replica's confirmation costs: the edge alone on a
3-master Redis Cluster with a replica each, answering 202 once the vote's
master holds it (9) or once a replica holds it too (10,
VOTEFLOW_REDIS_MIN_REPLICAS=1); measured one after the other in each round,
so their ratios are taken within it. docs/benchmarks.md (stages 9-10) says how.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import ClassVar

from voteflow.keys import Keys

from . import wrk
from .edge import append_totals, start_edge
from .redis_cluster import (
    SHARDS,
    client,
    cluster_env,
    confirmation,
    cpu,
    cpu_used,
    node_pids,
    rewrite_every_aof,
)
from .stack import Bench, Options
from .stage import Sample, WrkStage, median_extra
from .timing import Plan

NAME = "replicated"
MASTERS = 3
REPLICAS = 1


class ReplicatedCluster:
    """The cluster stages 9 and 10 share, and the PostgreSQL their edges read polls from."""

    def __init__(self, bench: Bench) -> None:
        self.servers = bench.redis_cluster(NAME, MASTERS, REPLICAS)
        self.database_url = bench.database(NAME)[1]
        self.client = client(self.servers)
        bench.stack.callback(self.client.close)
        self.confirmation = confirmation(self.servers)
        # Each stage's samples so far: stage 10 takes its latency ratio to the
        # sample stage 9 took just before it, in the same round.
        self.samples: dict[int, list[Sample]] = {}

    def empty(self) -> None:
        # FLUSHALL keeps the script cache, where the edges' admit.lua lives.
        self.client.flushall(target_nodes=self.client.PRIMARIES)
        rewrite_every_aof(self.servers)


class ReplicaEdge(WrkStage):
    """An edge on the replicated cluster, with `min_replicas` replicas to confirm."""

    min_replicas: ClassVar[int]
    # Starting the cluster, paid by the first such stage.
    cluster_start_s: ClassVar[float] = 6.0

    def plan(self, options: Options, started: set[str]) -> Plan:
        planned = super().plan(options, started)
        if NAME in started:
            return planned
        started.add(NAME)
        return replace(planned, start=planned.start + self.cluster_start_s)

    def start(self, bench: Bench) -> None:
        super().start(bench)
        self.cluster = bench.share(ReplicatedCluster)
        prefix = f"bench{self.number}"
        env = cluster_env(self.cluster.servers, self.cluster.database_url, prefix)
        env["VOTEFLOW_REDIS_MIN_REPLICAS"] = str(self.min_replicas)
        start_edge(self, f"edge-{self.number}", env)
        self.keys = Keys(prefix, SHARDS, cluster=True)
        self.redis_pids = node_pids(self.cluster.servers)
        self.redis_used = 0.0

    def reset(self) -> None:
        self.cluster.empty()

    def _wrk(self, duration: int, load: wrk.Load | None = None) -> wrk.WrkRun:
        # Every node's CPU over the same run as the edge's (WrkStage reads one store).
        before = cpu(self.redis_pids)
        run = super()._wrk(duration, load)
        self.redis_used = cpu_used(before)
        return run

    def stored(self) -> int:
        # XLEN of each shard, on the master that holds it.
        pipe = self.cluster.client.pipeline(transaction=False)  # type: ignore[no-untyped-call]
        for stream in self.keys.streams():
            pipe.xlen(stream)
        return sum(pipe.execute())

    def measure(self) -> Sample:
        before = append_totals(self.url)
        sample = super().measure()
        used = append_totals(self.url, since=before)
        extra = {}
        if batches := used.get("voteflow_append_batch_size_count", 0.0):
            extra["votes_per_batch"] = used["voteflow_append_batch_size_sum"] / batches
        if pipelines := used.get("voteflow_append_seconds_count", 0.0):
            # A batch goes out as one pipeline per master holding its votes'
            # shards, with WAIT/WAITAOF at its end on stage 10.
            extra["master_pipeline_ms"] = 1000 * used["voteflow_append_seconds_sum"] / pipelines
        earlier = self.cluster.samples.setdefault(self.number, [])
        if self.number == Confirmed.number:
            unconfirmed = self.cluster.samples.get(Unconfirmed.number, [])
            if len(unconfirmed) == len(earlier) + 1 and unconfirmed[-1].p50_ms > 0:
                extra["p50_ratio"] = sample.p50_ms / unconfirmed[-1].p50_ms
        sample = replace(sample, store_cpu_seconds=self.redis_used, extra=extra)
        earlier.append(sample)
        return sample

    def summary(self, samples: list[Sample]) -> str:
        parts = [
            f"{name.replace('_', ' ')} {median_extra(samples, name):.3g}"
            for name in ("votes_per_batch", "master_pipeline_ms")
            if any(name in s.extra for s in samples)
        ]
        return f"{MASTERS} masters, {REPLICAS} replica each; medians: " + ", ".join(parts)


class Unconfirmed(ReplicaEdge):
    number = 9
    name = "cluster-edge"
    title = (
        "voteflow edge -> Redis Cluster (3 masters + 1 replica each, appendfsync always), "
        "no worker; 202 once the master holds the vote (MIN_REPLICAS=0)"
    )
    min_replicas = 0


class Confirmed(ReplicaEdge):
    number = 10
    name = "cluster-edge-replicated"
    title = "as 9, 202 once a replica holds the vote too (MIN_REPLICAS=1); ratio to 9"
    ratio = (10, 9)
    min_replicas = 1

    def summary(self, samples: list[Sample]) -> str:
        text = super().summary(samples) + f"; confirmed with {self.cluster.confirmation}"
        ratios = [s.extra["p50_ratio"] for s in samples if "p50_ratio" in s.extra]
        if ratios:
            text += (
                f"; p50 latency over stage 9's, median of rounds "
                f"{statistics.median(ratios):.2f} (min-max {min(ratios):.2f}-{max(ratios):.2f})"
            )
        return text
