"""What the Redis Cluster stages (9-11) share: the environment of voteflow's
processes on a cluster, the cluster's CPU, and its append-only files rewritten
before a repeat."""

from __future__ import annotations

import asyncio

import redis
from redis.asyncio import RedisCluster as AsyncRedisCluster

from voteflow.redisconn import has_waitaof
from voteflow.servers import RedisClusterServers

from .procs import cpu_seconds
from .stack import rewrite_aof

SHARDS = 8  # VOTEFLOW_STREAM_SHARDS' default: 3, 3 and 2 on three masters


def cluster_env(servers: RedisClusterServers, database_url: str, prefix: str) -> dict[str, str]:
    """The VOTEFLOW_* settings every process of a cluster stage shares."""
    return {
        "VOTEFLOW_DATABASE_URL": database_url,
        "VOTEFLOW_REDIS_URL": servers.url,
        "VOTEFLOW_REDIS_CLUSTER": "true",
        "VOTEFLOW_KEY_PREFIX": prefix,
        "VOTEFLOW_STREAM_SHARDS": str(SHARDS),
        "VOTEFLOW_LOG_LEVEL": "WARNING",
    }


def client(servers: RedisClusterServers) -> redis.RedisCluster:
    """A cluster client for the bench's own reads (stream lengths, backlogs)."""
    found: redis.RedisCluster = redis.RedisCluster.from_url(servers.url, socket_timeout=30)
    return found


def node_pids(servers: RedisClusterServers, replicas: bool = True) -> list[int]:
    nodes = servers.servers if replicas else servers.masters
    pids = [node.pid for node in nodes]
    if None in pids:
        raise RuntimeError("a node of the bench's Redis Cluster is not running")
    return [pid for pid in pids if pid is not None]


def cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each process (a rewrite's forked child is not counted)."""
    return {pid: cpu_seconds(pid) for pid in pids}


def cpu_used(before: dict[int, float]) -> float:
    return sum(cpu_seconds(pid) - seconds for pid, seconds in before.items())


def rewrite_every_aof(servers: RedisClusterServers) -> None:
    """Let every node compact its append-only file, and wait for all of them."""
    for node in servers.servers:
        with redis.Redis.from_url(node.url, socket_timeout=30) as plain:
            rewrite_aof(plain)


def confirmation(servers: RedisClusterServers) -> str:
    """How an edge with VOTEFLOW_REDIS_MIN_REPLICAS > 0 confirms its appends on
    this cluster, by the edge's own rule: WAITAOF (a replica wrote the vote to
    its append-only file) or WAIT (a replica received it)."""

    async def ask() -> bool:
        found = AsyncRedisCluster.from_url(servers.url)
        try:
            await found.initialize()
            return await has_waitaof(found)
        finally:
            await found.aclose()

    return "WAITAOF" if asyncio.run(ask()) else "WAIT"
