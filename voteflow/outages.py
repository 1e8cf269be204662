"""Which errors mean "a server voteflow depends on is away for now", and which
mean "this one vote can never be written".

An outage is retried by the workers for as long as it lasts and answered 503
with Retry-After by the edge; it never counts against a vote. PostgreSQL's
errors are told apart by their SQLSTATE class, never by a list of exception
types: only the classes below that describe the data a statement was given can
be a vote's own fault. Every other class (connection 08, read-only or failed
transaction 25, rollbacks 40, resources 53, objects in use or locked 55,
operator intervention and timeouts 57, system 58, a missing function or a
privilege revoked 42, internal XX, and any class PostgreSQL adds later) is
something that refuses every vote alike, and so an outage.
"""

from __future__ import annotations

import asyncpg
from asyncpg.exceptions import _base as asyncpg_base
from redis.exceptions import RedisClusterException, RedisError

POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # starting up, shutting down, or out of connections
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # asyncpg's protocol confused by a connection the server ended while it
    # sat in the pool ("cannot switch to state 15; another operation (2) is in
    # progress", MagicStack/asyncpg#784 and #1069): a disconnect, not a bug of
    # ours; the pool replaces the connection.
    asyncpg_base.InternalClientError,
)

# SQLSTATE classes that describe what a statement was given: a data exception
# (22: a value out of range, bad text), an integrity constraint (23), a
# trigger's or a function's refusal (09, 27, 38, 39, 2F, P0), WITH CHECK (44).
# Of these only, an error can be a vote's own; even then the workers write the
# vote alone before they believe it (workers.consume).
DATA_CLASSES = frozenset({"09", "22", "23", "27", "2F", "38", "39", "44", "P0"})


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE a PostgreSQL error carries, if it is one."""
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None)
        return code if isinstance(code, str) else None
    return None


def is_bad_data(exc: BaseException) -> bool:
    """The error may be the fault of what was written (see DATA_CLASSES);
    asyncpg's own refusal to encode an argument is too."""
    if isinstance(exc, asyncpg_base.DataError):  # client side: an argument asyncpg cannot send
        return True
    code = sqlstate(exc)
    return code is not None and code[:2] in DATA_CLASSES


def is_postgres_outage(exc: BaseException) -> bool:
    """PostgreSQL (or the way to it) refuses everyone for now: retry, never
    blame the vote. Any SQLSTATE outside DATA_CLASSES is one."""
    if isinstance(exc, asyncpg.PostgresError):
        return not is_bad_data(exc)
    return isinstance(exc, POSTGRES_DOWN) and not is_bad_data(exc)


# RedisClusterException: no node of a cluster answers, or a slot has no master
# (during a failover); it is not a RedisError.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)
