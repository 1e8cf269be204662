"""A worker process's Prometheus metrics, in a registry of its own (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from voteflow.poolmetrics import PoolGauges, PoolStats

SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


@dataclass(slots=True)
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    batches: Counter = field(init=False)
    batch_size: Histogram = field(init=False)
    commit_seconds: Histogram = field(init=False)
    votes: Counter = field(init=False)
    lag_seconds: Histogram = field(init=False)
    dead_letters: Counter = field(init=False)
    reclaimed: Counter = field(init=False)
    commit_retries: Counter = field(init=False)
    backlog: Gauge = field(init=False)
    pending: Gauge = field(init=False)
    pool: PoolGauges = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.batches = Counter("voteflow_batches", "Batches committed.", registry=r)
        self.batch_size = Histogram(
            "voteflow_batch_size",
            "Votes per committed batch.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "voteflow_commit_seconds",
            "Duration of one cast_vote_atomic call.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.votes = Counter(
            "voteflow_votes_committed",
            "Votes written by cast_vote_atomic, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.lag_seconds = Histogram(
            "voteflow_end_to_end_lag_seconds",
            "Time from the edge receiving a vote to its commit in PostgreSQL.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.dead_letters = Counter(
            "voteflow_dead_letters",
            "Messages moved to a dead-letter stream, by reason.",
            ["reason"],
            registry=r,
        )
        self.reclaimed = Counter(
            "voteflow_reclaimed", "Messages claimed from a consumer that stopped.", registry=r
        )
        self.commit_retries = Counter(
            "voteflow_commit_retries", "Batch commits retried after PostgreSQL failed.", registry=r
        )
        self.backlog = Gauge(
            "voteflow_stream_backlog",
            "Entries in a shard not yet delivered to any worker.",
            ["shard"],
            registry=r,
        )
        self.pending = Gauge(
            "voteflow_stream_pending",
            "Entries in a shard delivered but not yet acknowledged.",
            ["shard"],
            registry=r,
        )
        self.pool = PoolGauges(r)

    def observe_pool(self, pool: PoolStats) -> None:
        self.pool.observe(pool)
