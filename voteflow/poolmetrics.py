"""The PostgreSQL pool's gauges, which the edge and the workers both export,
each process in its own registry (one definition, so their names agree)."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge


class PoolStats(Protocol):
    """What the gauges read of an asyncpg pool (structural, so that this module
    need not import asyncpg)."""

    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...


class PoolGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.size = Gauge(
            "voteflow_db_pool_size", "PostgreSQL connections open in the pool.", registry=registry
        )
        self.in_use = Gauge(
            "voteflow_db_pool_in_use",
            "PostgreSQL connections of the pool taken by a query or transaction.",
            registry=registry,
        )

    def observe(self, pool: PoolStats) -> None:
        size = pool.get_size()
        self.size.set(size)
        self.in_use.set(size - pool.get_idle_size())
