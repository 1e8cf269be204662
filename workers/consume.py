"""Stream consumers: read a batch, commit it with one call, acknowledge, publish.

Round trips per batch: one XREADGROUP, one ``cast_vote_atomic`` call, and one
Redis transaction that acknowledges the batch, moves rejected entries to the
dead letters and publishes the touched polls' tallies.

A message is acknowledged only after the transaction that wrote it committed.
A worker that dies in between leaves its messages pending; the reclaim job
hands them to a live worker, and ``cast_vote_atomic`` counts a vote_id once.

A vote goes to the dead letters only for a fault of its own: the function
rejects it (an unknown poll, an invalid ballot), or PostgreSQL refuses it with
a data error when it is written alone (a batch refused so is split in halves
until the vote at fault stands alone; the others are committed). Any other
error means PostgreSQL is away or refuses everyone (voteflow.outages): the
batch waits and is retried for as long as that lasts, and counts against no
vote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ResponseError,
    TryAgainError,
)

from voteflow.keys import GROUP, Keys, consumer
from voteflow.message import FIELD, MessageError, Vote, decode
from voteflow.outages import REDIS_DOWN, is_bad_data, is_postgres_outage, sqlstate
from voteflow.redisconn import AnyRedis, Nodes, RoutedPipeline
from voteflow.settings import Settings
from voteflow.tally import Tally
from voteflow.timeutil import now_us

from .ack import Acknowledger, Dead
from .metrics import WorkerMetrics
from .publish import Publisher

log = logging.getLogger(__name__)

# Outcomes of cast_vote_atomic that mean "this message can never be counted":
# they go to the dead letters with the outcome as the reason.
REJECTED = frozenset({"unknown_poll", "invalid"})
# The reason of a vote PostgreSQL refused alone ("refused: <SQLSTATE> <message>").
REFUSED = "refused"
MAX_BACKOFF = 5.0
# Where on_startup leaves the Writer in arq's ctx.
WRITER = "voteflow_writer"

Entry = tuple[bytes, dict[bytes, bytes] | None]


class Postponed(Exception):
    """PostgreSQL is away and the caller asked not to wait for it: nothing of
    the batch is acknowledged, and nothing counts against its votes."""


@dataclass(frozen=True, slots=True)
class Writer:
    """What every consumer of a worker process shares."""

    settings: Settings
    keys: Keys
    redis: AnyRedis
    # Per-master pipelines (on one Redis, the same client as `redis`).
    nodes: Nodes
    pool: asyncpg.Pool
    publisher: Publisher
    acknowledger: Acknowledger
    metrics: WorkerMetrics
    consumer: str

    def queue_ack(
        self,
        batch: RoutedPipeline,
        shard: int,
        entry_ids: Sequence[bytes],
        dead: Sequence[Dead],
        release: Sequence[str],
    ) -> None:
        """Queue in ``batch`` the acknowledgement of a shard's entries (``dead``
        ones moved to its dead letters) and the release of ``release``'s vote_ids."""
        self.acknowledger.queue(
            batch,
            self.keys.stream(shard),
            self.keys.dead_letters(shard),
            entry_ids,
            dead,
            [self.keys.vote_seen(shard, vote_id) for vote_id in release],
        )

    def queue_claim_release(self, batch: RoutedPipeline, release: Sequence[str]) -> None:
        """On a cluster, a vote_id's claim lives in its own slot: queue its
        release beside the acknowledgement (ack.lua releases the shard's key
        atomically)."""
        if self.keys.cluster:
            for vote_id in release:
                claim = self.keys.vote_claim(vote_id)
                batch.for_key(claim).delete(claim)


def consumer_name() -> str:
    return consumer(socket.gethostname(), os.getpid(), secrets.token_hex(3))


async def ensure_groups(redis: AnyRedis, keys: Keys) -> None:
    for stream in keys.streams():
        try:
            # From id 0: votes the edge appended before any worker ran count too.
            await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                continue
            # A Redis over maxmemory refuses XGROUP CREATE even for a group
            # that exists; a worker must still start then, for its draining is
            # what frees the memory.
            if isinstance(exc, OutOfMemoryError) and await _has_group(redis, stream):
                continue
            raise


async def _has_group(redis: AnyRedis, stream: str) -> bool:
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return False
    return any(group["name"] in (GROUP, GROUP.encode()) for group in groups)


async def consume(writer: Writer, shard: int, stop: asyncio.Event) -> None:
    """Read and commit batches from one shard until ``stop`` is set.

    A batch in hand is always finished (committed and acknowledged) first; the
    read blocks for one second at most, so a stop takes effect within that.
    """
    while not stop.is_set():
        try:
            await _consume(writer, shard, stop)
        except Exception:
            # A consumer must outlive any single failure, or its shard would
            # silently stop being written by this process. What it held stays
            # pending and is reclaimed.
            log.exception("shard %d: consumer failed; restarting in 1s", shard)
            await asyncio.sleep(1.0)


async def _consume(writer: Writer, shard: int, stop: asyncio.Event) -> None:
    stream = writer.keys.stream(shard)
    linger = writer.settings.batch_linger_ms / 1000
    backoff = 0.1
    while not stop.is_set():
        try:
            reply = await writer.redis.xreadgroup(
                GROUP, writer.consumer, {stream: ">"}, count=writer.settings.batch_size, block=1000
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                # The stream vanished (a Redis without persistence restarted).
                await ensure_groups(writer.redis, writer.keys)
                continue
            if not isinstance(exc, (ClusterDownError, TryAgainError)):
                raise
            # A cluster between a master's death and its replica's promotion.
            log.warning("shard %d: read failed (%r); retrying in %.1fs", shard, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
        except REDIS_DOWN as exc:
            log.warning("shard %d: read failed (%r); retrying in %.1fs", shard, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            continue
        backoff = 0.1
        if reply:
            entries = reply[0][1]
            try:
                await write_batch(writer, shard, entries)
            except REDIS_DOWN as exc:
                # Committed but not acknowledged: the entries stay pending and
                # are reclaimed; their second delivery is a duplicate.
                log.warning("shard %d: acknowledging failed: %s", shard, exc)
            if len(entries) < writer.settings.batch_size and linger:
                await asyncio.sleep(linger)


async def watch_backlog(writer: Writer, stop: asyncio.Event, every: float = 5.0) -> None:
    """Keep this process's backlog gauges current (every worker reports the
    same figures; dashboards take the max over workers), and its pool gauges."""
    while not stop.is_set():
        writer.metrics.observe_pool(writer.pool)
        for shard, stream in enumerate(writer.keys.streams()):
            with contextlib.suppress(*REDIS_DOWN):
                for group in await writer.redis.xinfo_groups(stream):
                    if group["name"] == GROUP.encode():
                        # lag is None when Redis cannot tell (entries deleted
                        # mid-stream); the length is then an upper bound.
                        lag = group.get("lag")
                        if lag is None:
                            lag = await writer.redis.xlen(stream)
                        writer.metrics.backlog.labels(str(shard)).set(lag)
                        writer.metrics.pending.labels(str(shard)).set(group["pending"])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()


async def write_batch(
    writer: Writer, shard: int, entries: Sequence[Entry], patient: bool = True
) -> None:
    """Commit, dead-letter and acknowledge a batch of entries of one shard.

    While PostgreSQL is away the batch is retried with backoff, or, when not
    ``patient`` (the reclaim job), :class:`Postponed` is raised at once.
    """
    stream = writer.keys.stream(shard)
    votes: list[Vote] = []
    decoded: list[tuple[bytes, bytes]] = []  # entry id and raw message of each vote
    dead: list[Dead] = []
    release: list[str] = []  # vote_ids of dead-lettered votes
    for entry_id, fields in entries:
        raw = (fields or {}).get(FIELD, b"")
        try:
            votes.append(decode(raw))
        except MessageError as exc:
            dead.append((entry_id, raw, f"undecodable: {exc}"))
            continue
        decoded.append((entry_id, raw))
    tallies: list[Tally] = []
    if votes:
        written = await _commit(
            writer, stream, [entry for entry, _ in entries], votes, patient=patient
        )
        committed_us = now_us()
        counts: dict[str, int] = {}
        for i, (row, (entry_id, raw)) in enumerate(zip(written.outcomes, decoded, strict=True)):
            outcome = REFUSED if row is None else row["outcome"]
            counts[outcome] = counts.get(outcome, 0) + 1
            if row is None or outcome in REJECTED:
                reason = written.refused[i] if row is None else outcome
                dead.append((entry_id, raw, reason))
                release.append(votes[i].vote_id)
        for row in written.tallies.values():
            tallies.append(
                Tally(
                    poll_id=str(row["poll_id"]),
                    version=row["version"],
                    total_ballots=row["total_ballots"],
                    votes={
                        str(option): n
                        for option, n in zip(row["option_ids"], row["votes"], strict=True)
                    },
                    as_of_us=committed_us,
                )
            )
        for outcome, n in counts.items():
            writer.metrics.votes.labels(outcome).inc(n)
        observe = writer.metrics.lag_seconds.observe
        for vote in votes:
            observe((committed_us - vote.received_us) / 1e6)
        writer.metrics.batches.inc()
        writer.metrics.batch_size.observe(len(votes))
    await _acknowledge(writer, shard, [entry_id for entry_id, _ in entries], dead, tallies, release)


@dataclass(slots=True)
class Written:
    """What PostgreSQL made of a batch: each vote's outcome row, in order
    (None for a vote it refused alone), why each refused vote was refused (by
    its place in the batch), and the latest tally of each poll touched."""

    outcomes: list[asyncpg.Record | None]
    refused: dict[int, str]
    tallies: dict[str, asyncpg.Record]


async def _commit(
    writer: Writer, stream: str, entry_ids: list[bytes], votes: list[Vote], patient: bool
) -> Written:
    """One cast_vote_atomic call, unless PostgreSQL refuses it.

    An outage: the same call again after a backoff, for as long as it lasts
    (or :class:`Postponed` when not ``patient``). A data error: the batch is
    split in halves, each written on its own, until the vote at fault stands
    alone and is refused; every other vote is committed. Splitting changes no
    result: the rules order a voter's ballots by receipt, not by batch.
    """
    args = [(v.vote_id, v.poll_id, v.voter, list(v.option_ids), v.received_us) for v in votes]
    written = Written([None] * len(votes), {}, {})
    todo = [list(range(len(votes)))]  # parts of the batch (places in it) still to write
    backoff = 0.1
    while todo:
        part = todo[-1]
        started = time.perf_counter()
        try:
            rows = await _cast(writer, [args[i] for i in part])
        except Exception as exc:
            if is_postgres_outage(exc):
                writer.metrics.commit_retries.inc()
                if not patient:
                    raise Postponed(str(exc)) from exc
                log.warning(
                    "commit of %d votes failed (%s: %s); retrying in %.1fs",
                    len(part), sqlstate(exc) or type(exc).__name__, exc, backoff,
                )  # fmt: skip
                await _keep_ownership(writer, stream, entry_ids)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if not is_bad_data(exc):
                raise
            todo.pop()
            if len(part) == 1:
                reason = f"{REFUSED}: {sqlstate(exc) or 'client'} {exc}"[:300]
                written.refused[part[0]] = reason
                log.error("vote %s refused by PostgreSQL: %s", votes[part[0]].vote_id, reason)
                continue
            half = len(part) // 2
            todo += [part[half:], part[:half]]
            continue
        todo.pop()
        backoff = 0.1
        writer.metrics.commit_seconds.observe(time.perf_counter() - started)
        # One row per vote, in the order given, then one per poll.
        for i, row in zip(part, rows[: len(part)], strict=True):
            written.outcomes[i] = row
        for row in rows[len(part) :]:
            poll_id = str(row["poll_id"])
            seen = written.tallies.get(poll_id)
            if seen is None or row["version"] > seen["version"]:
                written.tallies[poll_id] = row
    return written


async def _cast(writer: Writer, args: list[tuple[Any, ...]]) -> list[asyncpg.Record]:
    """The outcome of each vote, in order, then the tally of each poll.

    One call of cast_vote_atomic; on Citus, one call of cast_poll_votes per
    poll (same rules, same rows), each its own statement, so that Citus runs it
    on the node holding the poll. A retry after some polls committed is safe:
    their votes come back as duplicates.
    """
    if not writer.settings.database_citus:
        rows: list[asyncpg.Record] = await writer.pool.fetch(
            "SELECT * FROM cast_vote_atomic($1::vote_in[])", args
        )
        return rows
    by_poll: dict[str, list[int]] = {}
    for i, vote in enumerate(args):
        by_poll.setdefault(vote[1], []).append(i)
    outcomes: list[asyncpg.Record | None] = [None] * len(args)
    tallies: list[asyncpg.Record] = []
    for poll_id in sorted(by_poll):
        at = by_poll[poll_id]
        found = await writer.pool.fetch(
            "SELECT * FROM cast_poll_votes($1::uuid, $2::vote_in[])",
            poll_id,
            [args[i] for i in at],
        )
        for i, row in zip(at, found[: len(at)], strict=True):
            outcomes[i] = row
        tallies.extend(found[len(at) :])
    return [row for row in outcomes if row is not None] + tallies


async def _keep_ownership(writer: Writer, stream: str, entry_ids: Sequence[bytes]) -> None:
    """Reset the entries' idle time so the reclaim job does not take them
    (and count a delivery) while this consumer is still retrying them."""
    with contextlib.suppress(*REDIS_DOWN):
        await writer.redis.xclaim(stream, GROUP, writer.consumer, 0, list(entry_ids), justid=True)


async def _acknowledge(
    writer: Writer,
    shard: int,
    entry_ids: list[bytes],
    dead: list[Dead],
    tallies: list[Tally],
    release: Sequence[str] = (),
) -> None:
    # One round trip: the acknowledgement (with the dead letters, atomically
    # in ack.lua) and the tallies. On a cluster they go to the masters of the
    # shard and of the polls; a tally published without its acknowledgement,
    # or the reverse, is harmless (versions decide; a redelivery is counted once).
    batch = writer.nodes.pipeline()
    if entry_ids:
        writer.queue_ack(batch, shard, entry_ids, dead, release)
    writer.queue_claim_release(batch, release)
    for tally in tallies:
        writer.publisher.queue(batch, tally)
    replies = await batch.execute()
    if entry_ids and isinstance(replies[0], NoScriptError):
        # Redis restarted (or a replica took over) without the scripts: the
        # entries are still pending; acknowledge them again once the scripts
        # are back.
        await writer.acknowledger.load()
        retry = writer.nodes.pipeline()
        writer.queue_ack(retry, shard, entry_ids, dead, release)
        (acked,) = await retry.execute()
        if isinstance(acked, BaseException):
            raise acked
    elif entry_ids and isinstance(replies[0], BaseException):
        raise replies[0]
    for _, _, reason in dead:
        writer.metrics.dead_letters.labels(reason.split(":")[0]).inc()
    await writer.publisher.retry_unloaded(replies[len(replies) - len(tallies) :], tallies)
