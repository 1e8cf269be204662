"""A poll's tally over time, as the writers recorded it (sql/functions/tally_history.sql).

GET /api/polls/{id}/history?step_s=N: one point per step of N seconds in which
the tally changed, cumulative, so that a page opened late (or after a restart)
draws the whole curve and then follows the live tallies. A step with no point
kept the tally of the point before it.

Pages of a poll that a whole room opens at once ask for the same history: each
edge reads it from PostgreSQL at most once per :data:`FRESH_SECONDS` for a
poll and step, and concurrent requests share that one read.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
from async_lru import alru_cache

from voteflow.timeutil import to_us

from .polls import Poll

# Most points one answer carries: a day at one second is 86,400; a client
# asks for a coarser step beyond this (the error names the smallest).
MAX_POINTS = 10_000
# Largest step: a day. A chart of a poll that ran for years is not a use here.
MAX_STEP = 86_400
# How old a history an edge may answer with: about the live feed's own pace.
FRESH_SECONDS = 1.0
# Polls and steps whose history an edge keeps at once.
CACHE_SIZE = 4_096


class StepTooSmall(Exception):
    """The history at this step would have more than MAX_POINTS points."""

    def __init__(self, smallest: int) -> None:
        super().__init__(f"use a step_s of at least {smallest} for this poll")
        self.smallest = smallest


def smallest_step(first: datetime, last: datetime) -> int:
    """The smallest step at which a history from `first` to `last` has at
    most MAX_POINTS points."""
    seconds = (to_us(last) - to_us(first)) // 1_000_000
    # Buckets are aligned on the epoch: a span of s seconds meets at most
    # s // step + 2 of them.
    return max(1, math.ceil((seconds + 1) / (MAX_POINTS - 1)))


class History:
    """Histories read from PostgreSQL, each kept for FRESH_SECONDS."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._read: Callable[[str, int | None], Awaitable[tuple[int, list[asyncpg.Record]]]] = (
            alru_cache(maxsize=CACHE_SIZE, ttl=FRESH_SECONDS)(self._fetch)
        )

    async def _fetch(self, poll_id: str, step: int | None) -> tuple[int, list[asyncpg.Record]]:
        span = await self._pool.fetchrow(
            "SELECT min(at) AS first, max(at) AS last FROM tally_history WHERE poll_id = $1",
            poll_id,
        )
        smallest = 1 if span["first"] is None else smallest_step(span["first"], span["last"])
        if step is None:
            step = smallest
        elif step < smallest:
            raise StepTooSmall(smallest)
        rows = await self._pool.fetch("SELECT * FROM poll_history($1, $2)", poll_id, step)
        return step, rows

    async def of(self, poll: Poll, step: int | None) -> dict[str, Any]:
        """The body of the history route; `step` None: the smallest that fits.
        Raises :class:`StepTooSmall`."""
        step, rows = await self._read(poll.id, step)
        options = list(poll.labels)
        return {
            "poll_id": poll.id,
            "step_s": step,
            "points": [
                {
                    "t": row["t"],
                    "total_ballots": row["total_ballots"],
                    "votes": dict(zip(options, row["votes"], strict=True)),
                }
                for row in rows
            ],
        }
