"""Stage 2, the edge: votes/s of ``python -m voteflow edge`` appending to Redis
Streams, with no worker running, so that the edge alone is measured.

Private PostgreSQL and Redis (``appendfsync always``, as `voteflow up`), the
migrations, a poll created through the admin API; rate limits off and
VOTEFLOW_MAX_BACKLOG=0 (no shedding). Before each repeat Redis is emptied and
its append-only file rewritten, so each repeat starts alike; after it, the
stream entries are counted (every 202 must be one).
"""

from __future__ import annotations

import json
import secrets
import sys
import urllib.request
from dataclasses import replace
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

from voteflow.keys import Keys
from voteflow.servers import HOST, free_port

from .stack import Bench, rewrite_aof
from .stage import Sample, WrkStage

KEY_PREFIX = "bench"
SHARDS = 8  # VOTEFLOW_STREAM_SHARDS' default


class Edge(WrkStage):
    number = 2
    name = "edge"
    title = "voteflow edge -> Redis Streams (appendfsync always), no worker"
    ratio = (2, 1)
    processes = 1

    def start(self, bench: Bench) -> None:
        super().start(bench)
        servers = bench.servers()
        port = free_port()
        token = secrets.token_urlsafe(24)
        env = bench.child_env(
            VOTEFLOW_DATABASE_URL=servers.database_url,
            VOTEFLOW_REDIS_URL=servers.redis.url,
            VOTEFLOW_ADMIN_TOKEN=token,
            VOTEFLOW_HOST=HOST,
            VOTEFLOW_PORT=str(port),
            VOTEFLOW_KEY_PREFIX=KEY_PREFIX,
            VOTEFLOW_STREAM_SHARDS=str(SHARDS),
            VOTEFLOW_RATE_LIMIT_PER_IP="0",
            VOTEFLOW_RATE_LIMIT_PER_VOTER="0",
            VOTEFLOW_MAX_BACKLOG="0",
            VOTEFLOW_LOG_LEVEL="WARNING",
        )
        command = [sys.executable, "-m", "voteflow", "edge", "--processes", str(self.processes)]
        edge = bench.spawn(self.name, command, env)
        self.url = f"http://{HOST}:{port}"
        edge.wait_http(f"{self.url}/health")
        self.server = edge
        assert servers.redis.pid is not None
        self.store_pid = servers.redis.pid
        self.redis = redis.Redis.from_url(servers.redis.url, socket_timeout=10)
        bench.stack.callback(self.redis.close)
        self.keys = Keys(KEY_PREFIX, SHARDS)
        poll = create_poll(self.url, token)
        self.poll_id = poll["id"]
        self.option_ids = [option["id"] for option in poll["options"]]

    def reset(self) -> None:
        # Nothing of the edge's lives in Redis between requests but the
        # script cache, which FLUSHDB keeps.
        self.redis.flushdb()
        rewrite_aof(self.redis)

    def measure(self) -> Sample:
        """A repeat, and how the edge's appender fared meanwhile (from its /metrics)."""
        before = append_totals(self.url)
        sample = super().measure()
        used = {k: v - before.get(k, 0.0) for k, v in append_totals(self.url).items()}
        pipelines = used.get("voteflow_append_batch_size_count", 0.0)
        waited = used.get("voteflow_append_seconds_sum", 0.0)
        if not pipelines:
            return sample
        extra = {
            "redis_pipelines_per_s": pipelines / sample.seconds,
            "votes_per_pipeline": used["voteflow_append_batch_size_sum"] / pipelines,
            "pipeline_round_trip_ms": 1000 * waited / pipelines,
            # The average number of pipelines in flight (the appender keeps up
            # to 4): near that limit, the edge waits on Redis (and its fsync)
            # rather than on its own CPU.
            "pipelines_in_flight": waited / sample.seconds,
        }
        return replace(sample, extra=extra)

    def stored(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.keys.streams():
            pipe.xlen(stream)
        return sum(pipe.execute())


def append_totals(url: str) -> dict[str, float]:
    """The appender's histograms' sums and counts, from an edge's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("voteflow_append_batch_size", "voteflow_append_seconds"):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    totals[sample.name] = float(sample.value)
    return totals


def create_poll(url: str, token: str) -> dict[str, Any]:
    body = {"question": "Which one?", "options": ["A", "B", "C", "D"]}
    request = urllib.request.Request(
        f"{url}/api/polls",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        poll: dict[str, Any] = json.load(response)
    return poll


class EdgeProcesses(Edge):
    """Stage 12: stage 2 with `voteflow edge --processes 2` on the one port, to
    show what a second edge process adds on this machine (ratio to stage 2)."""

    number = 12
    name = "edge-2-processes"
    title = "voteflow edge --processes 2 -> Redis Streams, no worker"
    ratio = (12, 2)
    processes = 2
