"""The edge's Prometheus metrics, in a registry of the app's own (no globals).

With several edge processes on one port (``voteflow edge --processes N``), a
scrape reaches whichever process accepts it, so each one must answer for all
of them: the supervisor (ingest.prefork) then sets prometheus-client's
``PROMETHEUS_MULTIPROC_DIR`` to a directory of its own before any process
imports prometheus-client. Every process then keeps its values in files there
(prometheus-client decides that at import), and ``registry`` holds only a
``MultiProcessCollector``, which adds up the files of all of them: counters and
histograms summed over every process that ever ran (a replaced process's
counts stay), the live-stream gauge summed over the processes alive, the pool
gauges one series per process (a ``pid`` label, which the dashboards sum).
Without that variable, as with one process, the metrics live in ``registry``
itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from voteflow.poolmetrics import PoolGauges, PoolStats

# prometheus-client's own switch to multiprocess mode: the directory of the files.
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

# The methods counted by name; the others that HTTP's parser knows (some
# thirty: WebDAV's, SEARCH, ...) are counted as "other", so a client cannot
# add a series of its choosing to every route.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Request latencies of a queue-backed edge are sub-millisecond to seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


@dataclass(slots=True)
class EdgeMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    requests: Counter = field(init=False)
    request_seconds: Histogram = field(init=False)
    votes_accepted: Counter = field(init=False)
    votes_retried: Counter = field(init=False)
    votes_rejected: Counter = field(init=False)
    rate_limited: Counter = field(init=False)
    append_batch_size: Histogram = field(init=False)
    append_seconds: Histogram = field(init=False)
    unreplicated: Counter = field(init=False)
    live_subscribers: Gauge = field(init=False)
    live_dropped: Counter = field(init=False)
    live_refused: Counter = field(init=False)
    poll_reads: Counter = field(init=False)
    pool: PoolGauges = field(init=False)
    # Each request's two series, looked up once per (route, method, status)
    # rather than by prometheus-client's labels() on every request (its
    # checks and lock cost about as much as counting). Bounded: routes are
    # the app's own, methods METHODS or "other", statuses HTTP's.
    _request_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = field(
        init=False, default_factory=dict
    )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its time from request to response."""
        key = (route, method, status)
        series = self._request_series.get(key)
        if series is None:
            label = method if method in METHODS else "other"
            series = (
                self.requests.labels(route, label, status),
                self.request_seconds.labels(route),
            )
            self._request_series[key] = series
        count, timing = series
        count.inc()
        timing.observe(seconds)

    def __post_init__(self) -> None:
        r = self.registry
        shared = os.environ.get(MULTIPROC_DIR)
        if shared:
            # The metrics below go to a registry nobody reads (their values are
            # in the shared files); registering them in the one scraped too
            # would export this process's values twice.
            MultiProcessCollector(self.registry, path=shared)  # type: ignore[no-untyped-call]
            r = CollectorRegistry()
        self.requests = Counter(
            "voteflow_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "voteflow_http_request_seconds",
            "Time from request to response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.votes_accepted = Counter(
            "voteflow_votes_accepted", "Votes appended to a stream (answered 202).", registry=r
        )
        self.votes_retried = Counter(
            "voteflow_votes_retried",
            "Retries of a vote_id already queued (answered 202, not queued again).",
            registry=r,
        )
        self.votes_rejected = Counter(
            "voteflow_votes_rejected",
            "Votes refused at the edge, by reason.",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "voteflow_rate_limited", "Votes refused with 429 by a rate limit.", registry=r
        )
        self.append_batch_size = Histogram(
            "voteflow_append_batch_size",
            "Votes sent to Redis in one pipelined round trip.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.append_seconds = Histogram(
            "voteflow_append_seconds",
            "Duration of one append pipeline round trip.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.unreplicated = Counter(
            "voteflow_append_unreplicated",
            "Append pipelines that fewer replicas than VOTEFLOW_REDIS_MIN_REPLICAS "
            "confirmed in time; their votes were answered 503.",
            registry=r,
        )
        self.live_subscribers = Gauge(
            "voteflow_live_subscribers",
            "Open live tally streams (SSE and WebSocket).",
            registry=r,
            multiprocess_mode="livesum",  # with several processes: their sum
        )
        self.live_dropped = Counter(
            "voteflow_live_dropped",
            "Live watchers dropped because they left an update unread too long.",
            registry=r,
        )
        self.live_refused = Counter(
            "voteflow_live_refused",
            "Live streams refused: per_address (429, the client address holds "
            "VOTEFLOW_LIVE_MAX_PER_ADDRESS) or busy (503, live streams hold their share "
            "of the edge's connections).",
            ["reason"],
            registry=r,
        )
        self.poll_reads = Counter(
            "voteflow_poll_reads",
            "Polls read from PostgreSQL on a poll-cache miss, by whether one was found.",
            ["found"],
            registry=r,
        )
        self.pool = PoolGauges(r)

    def observe_pool(self, pool: PoolStats) -> None:
        self.pool.observe(pool)
