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
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import jwt
import redis
from prometheus_client.parser import text_string_to_metric_families

from voteflow.keys import Keys
from voteflow.servers import HOST, free_port

from . import wrk
from .stack import VOTEFLOW, Bench, rewrite_aof
from .stage import Sample, WrkStage

KEY_PREFIX = "bench"
SHARDS = 8  # VOTEFLOW_STREAM_SHARDS' default
# Stage 13's shared secret, and tokens minted per second of a run: more than
# one edge process answers here, so none is used twice in a run.
TOKEN_SECRET = secrets.token_urlsafe(32)
TOKENS_PER_SECOND = 8_000


class Edge(WrkStage):
    number = 2
    name = "edge"
    title = "voteflow edge -> Redis Streams (appendfsync always), no worker"
    ratio = (2, 1)
    processes = 1
    # Settings of the edge beyond the stage's own (a subclass's).
    extra_env: ClassVar[dict[str, str]] = {}

    def start(self, bench: Bench) -> None:
        super().start(bench)
        servers = bench.servers()
        storage = {
            "VOTEFLOW_DATABASE_URL": servers.database_url,
            "VOTEFLOW_REDIS_URL": servers.redis.url,
            "VOTEFLOW_KEY_PREFIX": KEY_PREFIX,
            "VOTEFLOW_STREAM_SHARDS": str(SHARDS),
            "VOTEFLOW_LOG_LEVEL": "WARNING",
        }
        start_edge(self, self.name, storage | self.extra_env, self.processes)
        assert servers.redis.pid is not None
        self.store_pid = servers.redis.pid
        self.redis = redis.Redis.from_url(servers.redis.url, socket_timeout=10)
        bench.stack.callback(self.redis.close)
        self.keys = Keys(KEY_PREFIX, SHARDS)

    def reset(self) -> None:
        # Nothing of the edge's lives in Redis between requests but the
        # script cache, which FLUSHDB keeps.
        self.redis.flushdb()
        rewrite_aof(self.redis)

    def measure(self) -> Sample:
        """A repeat, and how the edge's appender fared meanwhile (from its /metrics)."""
        before = append_totals(self.url)
        sample = super().measure()
        used = append_totals(self.url, since=before)
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
    """Stage 12: stage 2 with `voteflow edge --processes 2` on the one port, to
    show what a second edge process adds on this machine (ratio to stage 2)."""

    number = 12
    name = "edge-2-processes"
    title = "voteflow edge --processes 2 -> Redis Streams, no worker"
    ratio = (12, 2)
    processes = 2


class EdgeVoterTokens(Edge):
    """Stage 13: stage 2 with voter tokens (VOTEFLOW_VOTER_TOKEN_SECRET, HS256):
    every vote carries a token the edge has never seen, so each one's
    signature is checked (the cache of verified tokens never helps, as in a
    spike where each voter votes once). Ratio to stage 2: what proving every
    voter costs the edge."""

    number = 13
    name = "edge-voter-tokens"
    title = "stage 2 with a voter token (HS256) on every vote, each new to the edge"
    ratio = (13, 2)
    extra_env: ClassVar[dict[str, str]] = {"VOTEFLOW_VOTER_TOKEN_SECRET": TOKEN_SECRET}

    def _wrk(self, duration: int, load: wrk.Load | None = None) -> wrk.WrkRun:
        prefix = self.bench.work_dir / "voter-tokens"
        mint_tokens(prefix, self.bench.options.threads, TOKENS_PER_SECOND * duration)
        return super()._wrk(duration, wrk.Load(tokens=prefix))


def mint_tokens(prefix: Path, threads: int, total: int) -> None:
    """`total` voter tokens for new users, split into one file per wrk thread
    (outside the measured time: before wrk starts)."""
    tag = secrets.token_hex(4)
    expires = int(time.time()) + 3600
    per_thread = -(-total // threads)
    for thread in range(threads):
        lines = (
            jwt.encode({"sub": f"bench-{tag}-{thread}-{i}", "exp": expires}, TOKEN_SECRET)
            for i in range(per_thread)
        )
        Path(f"{prefix}.{thread}").write_text("\n".join(lines) + "\n")
