"""Polls as the edge sees them: read from PostgreSQL, cached, rendered as JSON.

The vote route checks every ballot against a cached copy of its poll, so a
vote costs no PostgreSQL round trip. A copy lives ``VOTEFLOW_POLL_CACHE_TTL``
seconds at most; closing a poll drops it at once on every edge through the
``polls-changed`` channel (see ingest.live). Concurrent misses for one poll
share a single query (async-lru coalesces them).

An id that names no poll is remembered apart, as long as a copy of a poll
is trusted and in a bounded cache of its own (:data:`MISSING_SIZE`): votes
for random or made-up poll ids then neither reach PostgreSQL each time an
id repeats nor take the slots of real polls, which they would evict. Poll
ids are UUIDs the database draws, so an id cannot name a poll before that
poll is created and read by its creator; closing or changing a poll drops
its entries from both caches.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from async_lru import alru_cache
from cachetools import TTLCache

from voteflow.outages import POSTGRES_DOWN
from voteflow.timeutil import from_us, to_us

if TYPE_CHECKING:
    # Not at run time: ingest.validate imports this module, and the pre-fork
    # supervisor must not import prometheus-client (ingest.metrics) early.
    from .metrics import EdgeMetrics

log = logging.getLogger(__name__)

# Enough for every poll that is live at once on any deployment we know of; a
# miss beyond it costs one indexed query, not a failure.
CACHE_SIZE = 50_000
# Ids that name no poll, remembered at once: a flood of distinct made-up ids
# cycles through these (least recently used first), never through real polls.
MISSING_SIZE = 10_000
# Characters of a list cursor: enough for any this edge hands out.
MAX_CURSOR = 128


@dataclass(frozen=True, slots=True)
class Poll:
    id: str
    question: str
    # option id -> label, in the poll's order
    labels: dict[str, str]
    allow_multiple_votes: bool
    max_choices: int
    expires_at: datetime | None
    closed_at: datetime | None
    created_at: datetime
    # Only voters proven by a voter token may vote (ingest.voters).
    require_voter_token: bool = False

    def is_open(self, at_us: int) -> bool:
        if self.closed_at is not None and to_us(self.closed_at) < at_us:
            return False
        return self.expires_at is None or at_us < to_us(self.expires_at)

    def to_json(self, now_us: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "options": [{"id": id_, "label": label} for id_, label in self.labels.items()],
            "allow_multiple_votes": self.allow_multiple_votes,
            "max_choices": self.max_choices,
            "expires_at": self.expires_at,
            "closed": not self.is_open(now_us),
            "closed_at": self.closed_at,
            "created_at": self.created_at,
            "require_voter_token": self.require_voter_token,
        }


def _poll(row: asyncpg.Record) -> Poll:
    return Poll(
        id=str(row["id"]),
        question=row["question"],
        labels={
            str(id_): label for id_, label in zip(row["option_ids"], row["labels"], strict=True)
        },
        allow_multiple_votes=row["allow_multiple_votes"],
        max_choices=row["max_choices"],
        expires_at=row["expires_at"],
        closed_at=row["closed_at"],
        created_at=row["created_at"],
        require_voter_token=row["require_voter_token"],
    )


async def fetch_poll(pool: asyncpg.Pool, poll_id: str) -> Poll | None:
    row = await pool.fetchrow("SELECT * FROM poll_get($1)", poll_id)
    return None if row is None or row["id"] is None else _poll(row)


async def create_poll(
    pool: asyncpg.Pool,
    question: str,
    labels: tuple[str, ...],
    allow_multiple_votes: bool,
    max_choices: int,
    expires_at: datetime | None,
    require_voter_token: bool = False,
) -> Poll:
    async with pool.acquire() as conn, conn.transaction():
        poll_id = await conn.fetchval(
            "SELECT create_poll($1, $2, $3, $4, $5)",
            question,
            list(labels),
            allow_multiple_votes,
            max_choices,
            expires_at,
        )
        if require_voter_token:
            await conn.execute("UPDATE polls SET require_voter_token = true WHERE id = $1", poll_id)
        row = await conn.fetchrow("SELECT * FROM poll_get($1)", poll_id)
    return _poll(row)


async def close_poll(pool: asyncpg.Pool, poll_id: str, closed_at: datetime) -> Poll | None:
    """Close a poll now; a poll that is already closed keeps its first close time."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT close_poll($1, $2)", poll_id, closed_at):
            return None
        row = await conn.fetchrow("SELECT * FROM poll_get($1)", poll_id)
    return _poll(row)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of the poll list starts: after this poll, newest first.

    Sent to clients as an opaque token; its form may change between versions.
    """

    created_us: int
    poll_id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_us}:{self.poll_id}".encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """Raises ValueError for anything this edge did not hand out."""
        if not 0 < len(token) <= MAX_CURSOR or not token.isascii():
            raise ValueError("bad cursor length")
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, poll_id = raw.split(":")
        return cls(int(created), uuid.UUID(poll_id))


# Which polls a list walks: GET /api/polls?state=.
STATES = ("open", "closed", "all")


@dataclass(frozen=True, slots=True)
class Listed:
    poll: Poll
    total_ballots: int  # counted ballots as PostgreSQL holds them


@dataclass(frozen=True, slots=True)
class Page:
    polls: list[Listed]
    next: Cursor | None  # None: the last page


async def list_polls(pool: asyncpg.Pool, state: str, after: Cursor | None, limit: int) -> Page:
    """A page of the polls in `state` (one of STATES), newest first."""
    before = (None, None) if after is None else (from_us(after.created_us), after.poll_id)
    # One row more than asked tells whether another page follows.
    rows = await pool.fetch("SELECT * FROM poll_list($1, $2, $3, $4)", state, *before, limit + 1)
    polls = [Listed(_poll(row), row["total_ballots"]) for row in rows[:limit]]
    more = len(rows) > limit
    last = polls[-1].poll if polls else None
    cursor = Cursor(to_us(last.created_at), uuid.UUID(last.id)) if more and last else None
    return Page(polls, cursor)


class _NoSuchPoll(Exception):
    """Raised inside the cache of polls so that it keeps no entry for the id
    (async-lru keeps no exception); PollCache.get turns it into None."""


class PollCache:
    """Polls by id, each read from PostgreSQL at most once per ``ttl``; ids
    that name no poll too, in a cache of their own.

    While PostgreSQL is away, the last copy read of a poll keeps being served
    (stale-if-error): votes for a live poll are still checked and queued, and
    the streams absorb them until the workers can write again.
    """

    def __init__(self, pool: asyncpg.Pool, ttl: float, metrics: EdgeMetrics) -> None:
        self._pool = pool
        self._metrics = metrics
        self._get: Callable[[str], Awaitable[Poll]] = alru_cache(
            maxsize=CACHE_SIZE, ttl=ttl if ttl > 0 else None
        )(self._fetch_known)
        self._ttl = ttl
        self._missing: TTLCache[str, bool] | None = TTLCache(MISSING_SIZE, ttl) if ttl > 0 else None
        self._last_read: OrderedDict[str, Poll] = OrderedDict()

    async def _fetch(self, poll_id: str) -> Poll | None:
        try:
            poll = await fetch_poll(self._pool, poll_id)
        except POSTGRES_DOWN as exc:
            stale = self._last_read.get(poll_id)
            if stale is None:
                raise
            log.warning("PostgreSQL unavailable (%r); serving poll %s as last read", exc, poll_id)
            return stale
        self._metrics.poll_reads.labels("true" if poll is not None else "false").inc()
        if poll is not None:
            self._last_read[poll_id] = poll
            self._last_read.move_to_end(poll_id)
            if len(self._last_read) > CACHE_SIZE:
                self._last_read.popitem(last=False)
        return poll

    async def _fetch_known(self, poll_id: str) -> Poll:
        poll = await self._fetch(poll_id)
        if poll is None:
            raise _NoSuchPoll(poll_id)
        return poll

    async def get(self, poll_id: str) -> Poll | None:
        if self._missing is None:  # no caching at all (ttl 0)
            return await self._fetch(poll_id)
        if poll_id in self._missing:
            return None
        try:
            return await self._get(poll_id)
        except _NoSuchPoll:
            self._missing[poll_id] = True
            return None

    @property
    def size(self) -> int:
        """Polls cached now; ids that name no poll are never among them."""
        return int(self._get.cache_info().currsize)  # type: ignore[attr-defined]

    def invalidate(self, poll_id: str) -> None:
        self._get.cache_invalidate(poll_id)  # type: ignore[attr-defined]
        if self._missing is not None:
            self._missing.pop(poll_id, None)
