"""Reading a poll's current tally: the workers' snapshot, else PostgreSQL."""

from __future__ import annotations

import logging

import asyncpg

from voteflow.keys import Keys
from voteflow.outages import REDIS_DOWN
from voteflow.redisconn import AnyRedis
from voteflow.tally import SNAPSHOT_TALLY, Tally, decode
from voteflow.timeutil import to_us

log = logging.getLogger(__name__)


async def tally_from_database(pool: asyncpg.Pool, poll_id: str) -> Tally:
    row = await pool.fetchrow("SELECT * FROM poll_tally($1)", poll_id)
    return Tally(
        poll_id=poll_id,
        version=row["version"],
        total_ballots=row["total_ballots"],
        votes={str(id_): n for id_, n in zip(row["option_ids"], row["votes"], strict=True)},
        as_of_us=to_us(row["updated_at"]),
    )


async def current_tally(redis: AnyRedis, pool: asyncpg.Pool, keys: Keys, poll_id: str) -> Tally:
    """One Redis round trip when the workers have published the poll.

    PostgreSQL answers when there is no snapshot yet (a poll nobody voted on)
    or Redis cannot be read: results stay available during a Redis outage.
    """
    try:
        raw = await redis.hget(keys.tally(poll_id), SNAPSHOT_TALLY)  # type: ignore[misc]
    except REDIS_DOWN as exc:
        log.warning("tally snapshot of %s unreadable, reading PostgreSQL: %s", poll_id, exc)
        raw = None
    if raw is not None:
        return decode(raw)
    return await tally_from_database(pool, poll_id)
