"""The arq worker: its settings, and the resources it opens and closes.

``voteflow worker`` (or ``arq workers.WorkerSettings``) runs one process. On
start-up it opens a PostgreSQL pool and a Redis client, creates the consumer
groups, and starts one stream consumer per shard; arq runs the reclaim cron
job. On SIGTERM or SIGINT each consumer finishes the batch in hand (commit,
then acknowledge) and the process exits.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from dataclasses import replace
from typing import Any

import asyncpg
from aiohttp import web
from arq.connections import ArqRedis, RedisSettings
from arq.cron import cron
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from voteflow.keys import Keys
from voteflow.outages import is_postgres_outage
from voteflow.redisconn import (
    Nodes,
    SlotOwner,
    SlotOwnerConnection,
    has_sharded_pubsub,
    open_redis,
)
from voteflow.settings import WORKER_METRICS_PORTS, Settings

from .ack import Acknowledger
from .consume import WRITER, Writer, consume, consumer_name, ensure_groups, watch_backlog
from .metrics import WorkerMetrics
from .publish import Publisher
from .reclaim import reclaim

log = logging.getLogger(__name__)

SETTINGS = "voteflow_settings"
CONSUMERS = "voteflow_consumers"
STOP = "voteflow_stop"
METRICS_RUNNER = "voteflow_metrics_runner"
SLOT_OWNER = "voteflow_slot_owner"
# A consumer still committing after this long is cancelled; its batch stays
# pending and another worker reclaims it.
SHUTDOWN_GRACE = 20.0
# The reclaim cron job's ticks, in seconds past the minute.
RECLAIM_EVERY = 5
# A worker rides out a Redis outage this long (retries 2 s apart at most),
# then exits for its supervisor to restart it.
REDIS_OUTAGE_TOLERANCE = 300
REDIS_RETRIES = REDIS_OUTAGE_TOLERANCE // 2


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx[SETTINGS]
    keys = Keys(settings.key_prefix, settings.stream_shards, settings.redis_cluster)
    metrics = WorkerMetrics()
    # First, so that its port is the first line a worker logs and a taken one
    # stops it before it connects to anything.
    ctx[METRICS_RUNNER] = await _serve_metrics(
        metrics, settings.worker_metrics_host, settings.worker_metrics_port
    )
    redis = open_redis(
        settings, socket_connect_timeout=2, health_check_interval=15,
        # Every shard's consumer holds a connection in a blocking read.
        max_connections=settings.stream_shards + 8,
    )  # fmt: skip
    # min_size=0: no connection is made here, so a worker started while
    # PostgreSQL is away (restarted by its supervisor mid-outage) starts, reads
    # its shards and waits out the outage like any batch; see _check_postgres.
    pool = await asyncpg.create_pool(
        settings.database_url, min_size=0, max_size=settings.consumers, timeout=5,
        statement_cache_size=settings.database_statement_cache_size,
    )  # fmt: skip
    await _check_postgres(pool)
    nodes = Nodes(redis, max_connections=settings.stream_shards + 8)
    await nodes.start()
    sharded = settings.redis_cluster and await has_sharded_pubsub(redis)
    publisher = Publisher(nodes, keys, sharded)
    await publisher.load()
    acknowledger = Acknowledger(nodes)
    await acknowledger.load()
    await ensure_groups(redis, keys)
    writer = Writer(
        settings, keys, redis, nodes, pool, publisher, acknowledger, metrics, consumer_name()
    )
    ctx[WRITER] = writer
    stop = ctx[STOP] = asyncio.Event()
    ctx[CONSUMERS] = [
        *(
            asyncio.create_task(consume(writer, shard, stop), name=f"consume-{shard}")
            for shard in range(keys.shards)
        ),
        asyncio.create_task(watch_backlog(writer, stop), name="watch-backlog"),
    ]
    log.info("worker %s consuming %d shards", writer.consumer, keys.shards)


async def _check_postgres(pool: asyncpg.Pool) -> None:
    """Say at start-up whether PostgreSQL answers; never stop for it."""
    try:
        await pool.fetchval("SELECT 1")
    except Exception as exc:
        if not is_postgres_outage(exc):
            raise
        log.warning("PostgreSQL does not answer (%s); batches wait for it", exc)


async def shutdown(ctx: dict[str, Any]) -> None:
    if STOP in ctx:
        ctx[STOP].set()
        consumers = ctx[CONSUMERS]
        _, late = await asyncio.wait(consumers, timeout=SHUTDOWN_GRACE)
        for task in late:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    if METRICS_RUNNER in ctx:
        await ctx[METRICS_RUNNER].cleanup()
    if WRITER in ctx:
        writer: Writer = ctx[WRITER]
        await writer.pool.close()
        await writer.nodes.close()
        await writer.redis.aclose()
    if SLOT_OWNER in ctx:
        await ctx[SLOT_OWNER].close()


class MetricsPortTaken(RuntimeError):
    """Other processes (other workers on this host, say) hold the metrics port."""


def _metrics_socket(host: str, port: int | None) -> socket.socket:
    """A socket bound for the worker's /metrics: on ``port``, or (None) on the
    first free port of WORKER_METRICS_PORTS, so that several workers started
    on one host with the defaults each get their own."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    candidates = WORKER_METRICS_PORTS if port is None else (port,)
    for candidate in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        # As asyncio's own servers do: a restarted worker rebinds at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            if port is None and exc.errno == errno.EADDRINUSE:
                continue
            raise MetricsPortTaken(
                f"the worker's metrics port {candidate} is taken ({exc.strerror}): give each "
                "worker on this host its own VOTEFLOW_WORKER_METRICS_PORT, or 0 for a free one, "
                "or leave it unset"
            ) from exc
        return sock
    first, last = WORKER_METRICS_PORTS[0], WORKER_METRICS_PORTS[-1]
    raise MetricsPortTaken(
        f"the worker's metrics ports {first}-{last} are all taken: set "
        "VOTEFLOW_WORKER_METRICS_PORT to a free port, or 0 for any free one"
    )


async def _serve_metrics(metrics: WorkerMetrics, host: str, port: int | None) -> web.AppRunner:
    async def get_metrics(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # Loopback by default (VOTEFLOW_WORKER_METRICS_HOST): the counts are for
    # the operator's Prometheus, not for anyone who can reach the host.
    sock = _metrics_socket(host, port)
    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    # Prometheus (or an operator) finds this worker by this line.
    log.info("worker metrics on %s port %s", host, sock.getsockname()[1])
    return runner


def _retrying() -> dict[str, Any]:
    # arq's own loop does not survive a Redis outage; its commands retry with
    # backoff instead, for up to REDIS_OUTAGE_TOLERANCE.
    return {
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), REDIS_RETRIES),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, OSError],
    }


def _arq_on_cluster(settings: Settings, keys: Keys) -> tuple[ArqRedis, SlotOwner]:
    """arq is not cluster-aware: its keys share one slot (Keys.arq_tag), and its
    connections go to that slot's master, found again after a failover."""
    owner = SlotOwner(settings.redis_url, keys.arq_tag())
    pool = ConnectionPool(
        connection_class=SlotOwnerConnection, slot_owner=owner, socket_connect_timeout=2,
        **_retrying(),
    )  # fmt: skip
    return ArqRedis(pool, default_queue_name=keys.arq_queue()), owner


def worker_settings(settings: Settings) -> dict[str, Any]:
    """arq's settings for a voteflow worker, whichever way it is started
    (``voteflow worker`` or ``arq workers.WorkerSettings``)."""
    settings.require_urls()
    keys = Keys(settings.key_prefix, settings.stream_shards, settings.redis_cluster)
    _abort_set_in_tag(keys)
    ctx: dict[str, Any] = {SETTINGS: settings}
    connection: dict[str, Any]
    if settings.redis_cluster:
        pool, ctx[SLOT_OWNER] = _arq_on_cluster(settings, keys)
        connection = {"redis_pool": pool}
    else:
        connection = {
            "redis_settings": replace(RedisSettings.from_dsn(settings.redis_url), **_retrying())
        }
    return {
        "functions": [],
        "cron_jobs": [
            cron(
                reclaim,
                # In arq's tag, as are the job keys arq derives from the name.
                name=f"{keys.arq_tag()}reclaim",
                second=set(range(0, 60, RECLAIM_EVERY)),
                run_at_startup=True,
                timeout=60,
            )
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": ctx,
        **connection,
        "queue_name": keys.arq_queue(),
        "health_check_key": keys.arq_health(),
        "keep_result": 0,
        "max_jobs": 4,
        "handle_signals": True,
        # On SIGTERM, let a reclaim run in progress finish instead of
        # cancelling it: arq ends with status 1, skipping on_shutdown (and so
        # the consumers' graceful stop), when it has to cancel a job.
        "job_completion_wait": int(SHUTDOWN_GRACE),
    }


def _abort_set_in_tag(keys: Keys) -> None:
    """arq names its set of aborted jobs with a constant ("arq:abort") and
    touches it in the transaction that finishes a job; on a Redis Cluster
    every key of a transaction must share a slot. A process runs one voteflow
    worker, so its arq uses a set inside voteflow's arq tag."""
    import arq.worker

    arq.worker.abort_jobs_ss = keys.arq_aborted()  # type: ignore[attr-defined]


def run(settings: Settings) -> None:
    import uvloop

    asyncio.set_event_loop(uvloop.new_event_loop())
    import arq.worker

    arq.worker.run_worker(worker_settings(settings))
