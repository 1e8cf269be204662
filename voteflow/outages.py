"""Which errors mean "a server voteflow depends on is away for now".

Such an error is retried by the workers and answered 503 with Retry-After by
the edge; any other error is a bug or bad data and is not retried blindly.
"""

from __future__ import annotations

import asyncpg
from redis.exceptions import RedisClusterException, RedisError

POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # starting up, shutting down, or out of connections
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)

# RedisClusterException: no node of a cluster answers, or a slot has no master
# (during a failover); it is not a RedisError.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)
