"""The arq cron job that keeps the streams healthy.

Every few seconds, in one worker of the pool (arq runs a cron job once per
tick, whatever the number of workers):

- claims entries left pending by a consumer that stopped (XAUTOCLAIM) and
  commits them like any batch; an entry delivered ``VOTEFLOW_MAX_DELIVERIES``
  times without being committed goes to the dead letters instead, so one
  poison message can never block its shard;
- forgets consumers that left long ago. (Acknowledged entries are trimmed
  as they are acknowledged, see ack.lua.)
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from voteflow.keys import GROUP
from voteflow.message import FIELD

from .consume import WRITER, Writer, write_batch

log = logging.getLogger(__name__)

# A consumer with nothing pending and silent this long is gone for good.
FORGET_CONSUMER_MS = 3_600_000
# Entries claimed per shard per tick; the rest waits for the next tick.
MAX_CLAIM_ROUNDS = 10


async def reclaim_shard(writer: Writer, shard: int) -> int:
    """Claim and commit one shard's abandoned entries; returns how many."""
    stream = writer.keys.stream(shard)
    settings = writer.settings
    start = "0-0"
    claimed_total = 0
    for _ in range(MAX_CLAIM_ROUNDS):
        start, claimed, _deleted = await writer.redis.xautoclaim(
            stream, GROUP, writer.consumer, settings.claim_idle_ms, start, settings.batch_size
        )
        if claimed:
            claimed_total += len(claimed)
            writer.metrics.reclaimed.inc(len(claimed))
            deliveries = await _deliveries(writer, stream, claimed[0][0], claimed[-1][0])
            poison = [e for e in claimed if deliveries.get(e[0], 0) > settings.max_deliveries]
            if poison:
                await _dead_letter(writer, shard, poison)
            await _write_isolating_failures(writer, shard, [e for e in claimed if e not in poison])
        if start in (b"0-0", "0-0"):
            break
    return claimed_total


async def _write_isolating_failures(writer: Writer, shard: int, entries: list[Any]) -> None:
    """Commit reclaimed entries as one batch; if PostgreSQL refuses the batch,
    commit them one by one, so that one bad entry is left pending (and dead-
    lettered after its deliveries run out) without holding back the others."""
    if not entries:
        return
    try:
        await write_batch(writer, shard, entries)
        return
    except asyncpg.PostgresError:
        log.warning("shard %d: reclaimed batch failed; retrying entry by entry", shard)
    for entry in entries:
        try:
            await write_batch(writer, shard, [entry])
        except asyncpg.PostgresError:
            log.exception("shard %d: entry %r failed; left pending", shard, entry[0])


async def _deliveries(writer: Writer, stream: str, first: bytes, last: bytes) -> dict[bytes, int]:
    pending = await writer.redis.xpending_range(
        stream, GROUP, min=first, max=last, count=writer.settings.batch_size * 2,
        consumername=writer.consumer,
    )  # fmt: skip
    return {p["message_id"]: p["times_delivered"] for p in pending}


async def _dead_letter(writer: Writer, shard: int, entries: list[Any]) -> None:
    dead = [
        (entry_id, (fields or {}).get(FIELD, b""), "max_deliveries") for entry_id, fields in entries
    ]
    batch = writer.nodes.pipeline()
    writer.acknowledger.queue(
        batch,
        writer.keys.stream(shard),
        writer.keys.dead_letters(shard),
        [entry_id for entry_id, _ in entries],
        dead,
    )
    (acked,) = await batch.execute()
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
