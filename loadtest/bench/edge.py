"""The stages of ``voteflow edge`` alone, appending to Redis Streams with no
worker running: 2 (one Redis), 12 (two edge processes), 13 (a voter token on
every vote), 9 and 10 (a Redis Cluster with a replica per master, 202 before
and after a replica confirms).

Rate limits off and VOTEFLOW_MAX_BACKLOG=0 (no shedding). Before each repeat
every Redis node is emptied and its append-only file rewritten, so each
repeat starts alike; after it, the stream entries are counted (every 202 must
be one), and the edge's /metrics tell how its appender fared.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import jwt
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import RedisCluster

from voteflow.redisconn import has_waitaof
from voteflow.servers import HOST, free_port

from . import wrk
from .stack import VOTEFLOW, Bench, Options, Store
from .stage import Plan, Sample, WrkStage, median_extra

# Stage 13's shared secret, and tokens minted per second of a run: more than
# one edge process answers here, so none is used twice in a run.
TOKEN_SECRET = secrets.token_urlsafe(32)
TOKENS_PER_SECOND = 8_000
# Stages 9 and 10's cluster, and the seconds to start it, paid by the first.
CLUSTER, MASTERS, REPLICAS, CLUSTER_START_S = "replicated", 3, 1, 6.0


class Edge(WrkStage):
    number = 2
    name = "edge"
    title = "voteflow edge -> Redis Streams (appendfsync always), no worker"
    ratio: ClassVar[tuple[int, int] | None] = (2, 1)
    processes = 1

    def store(self, bench: Bench) -> Store:
        return bench.store()

    def start(self, bench: Bench) -> None:
        super().start(bench)
        self.servers = self.store(bench)
        self.prefix = f"bench{self.number}"
        env = self.servers.env(self.prefix) | self.settings()
        start_edge(self, f"edge-{self.number}", env, self.processes)
        self.store_pids = self.servers.redis_pids
        self.redis = self.servers.client(bench.stack)

    def settings(self) -> dict[str, str]:
        """The edge's settings beyond the stage's own (a subclass's)."""
        return {}

    def reset(self) -> None:
        self.servers.compact(empty=True)

    def stored(self) -> int:
        return self.servers.stream_entries(self.redis, self.prefix)

    def measure(self) -> Sample:
        """A repeat, and how the edge's appender fared meanwhile (from its /metrics)."""
        before = append_totals(self.url)
        sample = super().measure()
        used = append_totals(self.url, since=before)
        batches = used.get("voteflow_append_batch_size_count", 0.0)
        # One pipeline per batch on one Redis; on a cluster, one per master
        # holding its votes' shards, with WAIT or WAITAOF at its end on stage 10.
        pipelines = used.get("voteflow_append_seconds_count", 0.0)
        waited = used.get("voteflow_append_seconds_sum", 0.0)
        if not batches or not pipelines:
            return sample
        extra = {
            "votes_per_batch": used["voteflow_append_batch_size_sum"] / batches,
            "pipelines_per_s": pipelines / sample.seconds,
            "pipeline_ms": 1000 * waited / pipelines,
            # The average number of pipelines in flight (the appender keeps up
            # to 4): near that limit, the edge waits on Redis (and its fsync)
            # rather than on its own CPU.
            "pipelines_in_flight": waited / sample.seconds,
        }
        return replace(sample, extra=extra)


def start_edge(stage: WrkStage, name: str, env: dict[str, str], processes: int = 1) -> None:
    """Start `voteflow edge` for `stage` with `env` (where it stores votes),
    rate limits off and no shedding, and create the poll it is sent votes on."""
    port = free_port()
    token = secrets.token_urlsafe(24)
    env = stage.bench.child_env(
        **env,
        VOTEFLOW_ADMIN_TOKEN=token,
        VOTEFLOW_HOST=HOST,
        VOTEFLOW_PORT=str(port),
        VOTEFLOW_RATE_LIMIT_PER_IP="0",
        VOTEFLOW_RATE_LIMIT_PER_VOTER="0",
        VOTEFLOW_MAX_BACKLOG="0",
    )
    command = [*VOTEFLOW, "edge", "--processes", str(processes)]
    stage.server = stage.bench.spawn(name, command, env)
    stage.url = f"http://{HOST}:{port}"
    stage.server.wait_http(f"{stage.url}/health")
    stage.poll_id, stage.option_ids = create_poll(stage.url, token)


def append_totals(url: str, since: dict[str, float] | None = None) -> dict[str, float]:
    """The appender's histograms' sums and counts, from an edge's /metrics
    (less those read `since`, if given)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("voteflow_append_batch_size", "voteflow_append_seconds"):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    totals[sample.name] = float(sample.value) - (since or {}).get(sample.name, 0)
    return totals


def create_poll(url: str, token: str) -> tuple[str, list[str]]:
    """A new poll of four options: its id and its options' ids."""
    body = {"question": "Which one?", "options": ["A", "B", "C", "D"]}
    request = urllib.request.Request(
        f"{url}/api/polls",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        poll: dict[str, Any] = json.load(response)
    return poll["id"], [option["id"] for option in poll["options"]]


class EdgeProcesses(Edge):
    """Stage 12: what a second edge process on the one port adds on this machine."""

    number = 12
    name = "edge-2-processes"
    title = "voteflow edge --processes 2 -> Redis Streams, no worker"
    ratio = (12, 2)
    processes = 2


class EdgeVoterTokens(Edge):
    """Stage 13: every vote carries a voter token (HS256) the edge has never
    seen, so each one's signature is checked (the cache of verified tokens
    never helps, as in a spike where each voter votes once): what proving
    every voter costs the edge."""

    number = 13
    name = "edge-voter-tokens"
    title = "stage 2 with a voter token (HS256) on every vote, each new to the edge"
    ratio = (13, 2)

    def settings(self) -> dict[str, str]:
        return {"VOTEFLOW_VOTER_TOKEN_SECRET": TOKEN_SECRET}

    def _wrk(self, duration: int, load: wrk.Load | None = None) -> wrk.WrkRun:
        # Minted for new voters before wrk starts, outside the measured time.
        prefix = self.bench.work_dir / "voter-tokens"
        threads, expires, tag = self.bench.options.threads, int(time.time()) + 3600, prefix.stem
        per_thread = -(-TOKENS_PER_SECOND * duration // threads)
        for thread in range(threads):
            lines = (
                jwt.encode({"sub": f"bench-{tag}-{thread}-{i}", "exp": expires}, TOKEN_SECRET)
                for i in range(per_thread)
            )
            Path(f"{prefix}.{thread}").write_text("\n".join(lines) + "\n")
        return super()._wrk(duration, wrk.Load(tokens=prefix))


class ClusterEdge(Edge):
    """Stages 9 and 10: the edge on a 3-master Redis Cluster with a replica
    each, with `min_replicas` replicas to confirm each append."""

    number = 9
    name = "cluster-edge"
    title = (
        "voteflow edge -> Redis Cluster (3 masters + 1 replica each, appendfsync always), "
        "no worker; 202 once the master holds the vote (MIN_REPLICAS=0)"
    )
    ratio: ClassVar[tuple[int, int] | None] = None
    min_replicas = 0

    def store(self, bench: Bench) -> Store:
        return bench.store(CLUSTER, MASTERS, REPLICAS)

    def plan(self, options: Options, started: set[str]) -> Plan:
        planned = super().plan(options, started)
        if CLUSTER in started:
            return planned
        started.add(CLUSTER)
        return replace(planned, start=planned.start + CLUSTER_START_S)

    def settings(self) -> dict[str, str]:
        return {"VOTEFLOW_REDIS_MIN_REPLICAS": str(self.min_replicas)}

    def summary(self, samples: list[Sample]) -> str:
        parts = [
            f"{name.replace('_', ' ')} {median_extra(samples, name):.3g}"
            for name in ("votes_per_batch", "pipeline_ms")
            if any(name in s.extra for s in samples)
        ]
        return f"{MASTERS} masters, {REPLICAS} replica each; medians: " + ", ".join(parts)


class ConfirmedClusterEdge(ClusterEdge):
    number = 10
    name = "cluster-edge-replicated"
    title = "as 9, 202 once a replica holds the vote too (MIN_REPLICAS=1); ratio to 9"
    ratio = (10, 9)
    min_replicas = 1

    def measure(self) -> Sample:
        sample = super().measure()
        # Stage 9's sample of this round, measured just before: the stages
        # run one after the other in each round.
        unconfirmed = self.bench.samples.get(ClusterEdge.number, [])
        same_round = len(unconfirmed) == len(self.bench.samples[self.number]) + 1
        if same_round and (before := unconfirmed[-1].p50_ms) > 0:
            return replace(sample, extra=sample.extra | {"p50_ratio": sample.p50_ms / before})
        return sample

    def summary(self, samples: list[Sample]) -> str:
        text = super().summary(samples) + f"; confirmed with {self.confirmation}"
        ratios = [s.extra["p50_ratio"] for s in samples if "p50_ratio" in s.extra]
        if ratios:
            text += (
                f"; p50 latency over stage 9's, median of rounds "
                f"{statistics.median(ratios):.2f} (min-max {min(ratios):.2f}-{max(ratios):.2f})"
            )
        return text

    def start(self, bench: Bench) -> None:
        super().start(bench)
        self.confirmation = self._confirmation()

    def _confirmation(self) -> str:
        """How the edge confirms its appends on this cluster, by its own rule:
        WAITAOF (a replica wrote the vote to its append-only file) or WAIT."""

        async def ask() -> bool:
            client = RedisCluster.from_url(self.servers.redis_url)
            try:
                await client.initialize()
                return await has_waitaof(client)
            finally:
                await client.aclose()

        return "WAITAOF" if asyncio.run(ask()) else "WAIT"
