"""The arq cron job that keeps the streams healthy.

Every few seconds, in one worker of the pool (arq runs a cron job once per
tick, whatever the number of workers):

- claims entries left pending by a consumer that stopped (XAUTOCLAIM) and
  commits them like any batch;
- forgets consumers that left long ago. (Acknowledged entries are trimmed
  as they are acknowledged, see ack.lua.)

A claim counts one delivery of each entry. While PostgreSQL is away the job
does not wait for it: it gives the entries back their count and leaves them
for a later tick, so an outage, however long, never adds deliveries. What
remains counted is the death of a worker (or a crash of its batch) while it
held the entry: an entry delivered more than ``VOTEFLOW_MAX_DELIVERIES`` times
has killed that many holders, and goes to the dead letters instead of killing
another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from voteflow.keys import GROUP
from voteflow.message import FIELD, MessageError, decode

from .consume import WRITER, Entry, Postponed, Writer, write_batch

log = logging.getLogger(__name__)

# A consumer with nothing pending and silent this long is gone for good.
FORGET_CONSUMER_MS = 3_600_000
# Entries claimed per shard per tick; the rest waits for the next tick.
MAX_CLAIM_ROUNDS = 10
# Longest a reclaimed batch may take to commit before it is given back for a
# later tick (PostgreSQL hanging, not refusing); well within the job's timeout.
WRITE_TIMEOUT = 20.0


async def reclaim_shard(writer: Writer, shard: int) -> int:
    """Claim and commit one shard's abandoned entries; returns how many were
    committed (or dead-lettered)."""
    stream = writer.keys.stream(shard)
    settings = writer.settings
    start = "0-0"
    done = 0
    for _ in range(MAX_CLAIM_ROUNDS):
        start, claimed, _deleted = await writer.redis.xautoclaim(
            stream, GROUP, writer.consumer, settings.claim_idle_ms, start, settings.batch_size
        )
        if claimed:
            writer.metrics.reclaimed.inc(len(claimed))
            deliveries = await _deliveries(writer, stream, claimed[0][0], claimed[-1][0])
            poison = [e for e in claimed if deliveries.get(e[0], 0) > settings.max_deliveries]
            if poison:
                await _dead_letter(writer, shard, poison)
            rest = [e for e in claimed if e not in poison]
            if not await _write_or_give_back(writer, shard, rest, deliveries):
                return done + len(poison)
            done += len(claimed)
        if start in (b"0-0", "0-0"):
            break
    return done


async def _write_or_give_back(
    writer: Writer, shard: int, entries: list[Entry], deliveries: dict[bytes, int]
) -> bool:
    """Commit reclaimed entries; False when PostgreSQL is away (or hangs), after
    undoing the delivery this claim counted."""
    if not entries:
        return True
    try:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await write_batch(writer, shard, entries, patient=False)
        return True
    except (Postponed, TimeoutError) as exc:
        log.warning(
            "shard %d: %d reclaimed entries wait for PostgreSQL (%s)", shard, len(entries), exc
        )
        await _give_back(writer, shard, entries, deliveries)
        return False
    except asyncio.CancelledError:
        # The job's own timeout or a shutdown: not the entries' fault either.
        await asyncio.shield(_give_back(writer, shard, entries, deliveries))
        raise


async def _give_back(
    writer: Writer, shard: int, entries: Sequence[Entry], deliveries: dict[bytes, int]
) -> None:
    """Set each entry's delivery count back to what it was before this claim
    (XCLAIM ... RETRYCOUNT, JUSTID: which itself counts nothing)."""
    stream = writer.keys.stream(shard)
    by_count: dict[int, list[Any]] = {}
    for entry_id, _ in entries:
        by_count.setdefault(max(deliveries.get(entry_id, 1) - 1, 0), []).append(entry_id)
    for count, ids in by_count.items():
        await writer.redis.xclaim(
            stream, GROUP, writer.consumer, 0, ids, retrycount=count, justid=True
        )


async def _deliveries(writer: Writer, stream: str, first: bytes, last: bytes) -> dict[bytes, int]:
    pending = await writer.redis.xpending_range(
        stream, GROUP, min=first, max=last, count=writer.settings.batch_size * 2,
        consumername=writer.consumer,
    )  # fmt: skip
    return {p["message_id"]: p["times_delivered"] for p in pending}


async def _dead_letter(writer: Writer, shard: int, entries: list[Any]) -> None:
    dead = []
    release = []
    for entry_id, fields in entries:
        raw = (fields or {}).get(FIELD, b"")
        dead.append((entry_id, raw, "max_deliveries"))
        try:
            vote = decode(raw)
        except MessageError:
            continue
        release.append(vote.vote_id)
    batch = writer.nodes.pipeline()
    writer.queue_ack(batch, shard, [entry_id for entry_id, _ in entries], dead, release)
    writer.queue_claim_release(batch, release)
    (acked, *_) = await batch.execute()
    if isinstance(acked, BaseException):
        raise acked
    writer.metrics.dead_letters.labels("max_deliveries").inc(len(entries))
    log.error("shard %d: %d entries dead-lettered after too many deliveries", shard, len(entries))


async def forget_gone_consumers(writer: Writer, shard: int) -> None:
    """Drop consumers with nothing pending that have been silent for long."""
    stream = writer.keys.stream(shard)
    for consumer in await writer.redis.xinfo_consumers(stream, GROUP):
        if consumer["pending"] == 0 and consumer["idle"] > FORGET_CONSUMER_MS:
            await writer.redis.xgroup_delconsumer(stream, GROUP, consumer["name"])


async def reclaim(ctx: dict[str, Any]) -> int:
    """The cron job: every shard, one after the other."""
    writer: Writer = ctx[WRITER]
    total = 0
    for shard in range(writer.keys.shards):
        try:
            total += await reclaim_shard(writer, shard)
            await forget_gone_consumers(writer, shard)
        except RedisError as exc:
            log.warning("reclaim of shard %d failed: %s", shard, exc)
    return total
