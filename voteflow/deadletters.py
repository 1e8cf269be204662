"""The ``voteflow deadletters`` command: list dead letters, and requeue them.

A dead letter is a vote a worker could not count for a fault of its own (see
workers.consume): its message, the stream entry it came from and the reason.
Once the cause is fixed (a trigger that refused it dropped, a poll restored),
``requeue`` sends it back to its stream shard, where a worker writes it like
any vote: with its own vote_id and the time the edge received it, so the
rules place it where it was cast, and ``cast_vote_atomic`` counts it once even
if the client's retry was counted meanwhile. Both take ``--shard``, ``--poll``
and ``--reason`` (a prefix, e.g. ``refused``) to choose.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson
from redis.exceptions import RedisError

from .keys import Keys
from .message import FIELD, MessageError, Vote, decode
from .redisconn import AnyRedis, LuaScript, open_redis
from .settings import Settings, SettingsError

# Dead letters read per round trip.
PAGE = 500
# Exit statuses: 0 done (or nothing to do), 2 could not run.
CANNOT_RUN = 2
SCRIPT = LuaScript.read(Path(__file__).parent / "requeue.lua")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    shard: int
    id: str  # the dead letter's own id in its stream
    entry: str  # the id the vote had in its stream shard
    reason: str
    message: bytes
    vote: Vote | None  # None: the message cannot be decoded

    def as_dict(self) -> dict[str, Any]:
        vote = self.vote
        return {
            "shard": self.shard,
            "id": self.id,
            "entry": self.entry,
            "reason": self.reason,
            "vote_id": vote.vote_id if vote else None,
            "poll_id": vote.poll_id if vote else None,
            "option_ids": list(vote.option_ids) if vote else None,
            "received_at": _time(vote.received_us) if vote else None,
        }


@dataclass(frozen=True, slots=True)
class Choice:
    shard: int | None = None
    poll_id: str | None = None
    reason: str | None = None

    def takes(self, letter: DeadLetter) -> bool:
        if self.poll_id is not None and (
            letter.vote is None or letter.vote.poll_id != self.poll_id
        ):
            return False
        return self.reason is None or letter.reason.startswith(self.reason)


def _time(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="milliseconds")


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


async def dead_letters(redis: AnyRedis, keys: Keys, choice: Choice) -> AsyncIterator[DeadLetter]:
    """The chosen dead letters, shard by shard, oldest first."""
    shards = range(keys.shards) if choice.shard is None else [choice.shard]
    for shard in shards:
        start = "-"
        while True:
            page = await redis.xrange(keys.dead_letters(shard), start, "+", count=PAGE)
            for letter_id, fields in page:
                message = fields.get(FIELD, b"")
                try:
                    vote: Vote | None = decode(message)
                except MessageError:
                    vote = None
                letter = DeadLetter(
                    shard,
                    _text(letter_id),
                    _text(fields.get(b"entry")),
                    _text(fields.get(b"reason")),
                    message,
                    vote,
                )
                if choice.takes(letter):
                    yield letter
            if len(page) < PAGE:
                break
            start = "(" + _text(page[-1][0])


async def requeue(
    redis: AnyRedis, keys: Keys, letter: DeadLetter, idempotency_window: int
) -> str | None:
    """Send one dead letter back to its shard; its new entry id, or None when
    it was gone or cannot be decoded (it would only come back)."""
    if letter.vote is None:
        return None
    script_keys = [
        keys.dead_letters(letter.shard),
        keys.stream(letter.shard),
        keys.vote_seen(letter.shard, letter.vote.vote_id),
    ]
    new_id = await redis.eval(
        SCRIPT.source,
        len(script_keys),
        *script_keys,
        letter.id,
        FIELD.decode(),
        str(idempotency_window),
        letter.vote.digest(),
    )  # type: ignore[misc]
    if new_id is not None and keys.cluster:
        # Its claim, in the vote_id's own slot (ingest.append): after the
        # move, so a failure here leaves a retry of the same ballot admitted.
        await redis.set(
            keys.vote_claim(letter.vote.vote_id), letter.vote.digest(), ex=idempotency_window
        )
    return None if new_id is None else _text(new_id)


async def run(
    settings: Settings,
    action: str,
    choice: Choice,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``voteflow deadletters list|requeue``: print, return the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if choice.shard is not None and not 0 <= choice.shard < settings.stream_shards:
        print(
            f"voteflow deadletters: --shard must be 0 to {settings.stream_shards - 1}, "
            f"got {choice.shard}",
            file=err,
        )
        return CANNOT_RUN
    keys = Keys(settings.key_prefix, settings.stream_shards, settings.redis_cluster)
    try:
        if not settings.redis_url:
            raise SettingsError("VOTEFLOW_REDIS_URL is not set")
        redis = open_redis(settings, max_connections=4)
        try:
            if action == "list":
                return await _list(redis, keys, choice, as_json, out)
            return await _requeue(redis, keys, choice, settings.idempotency_window, as_json, out)
        finally:
            await redis.aclose()
    except (SettingsError, RedisError, OSError) as exc:
        print(f"voteflow deadletters: {exc}", file=err)
        return CANNOT_RUN


async def _list(redis: AnyRedis, keys: Keys, choice: Choice, as_json: bool, out: TextIO) -> int:
    found = [letter async for letter in dead_letters(redis, keys, choice)]
    if as_json:
        out.write(orjson.dumps([letter.as_dict() for letter in found]).decode() + "\n")
        return 0
    for letter in found:
        row = letter.as_dict()
        what = (
            f"vote {row['vote_id']} poll {row['poll_id']} received {row['received_at']}"
            if letter.vote
            else "undecodable message"
        )
        out.write(f"shard {letter.shard} {letter.id}: {what}: {letter.reason}\n")
    out.write(f"{len(found)} dead letter(s)\n")
    return 0


async def _requeue(
    redis: AnyRedis, keys: Keys, choice: Choice, window: int, as_json: bool, out: TextIO
) -> int:
    requeued: list[dict[str, Any]] = []
    skipped = 0
    async for letter in dead_letters(redis, keys, choice):
        new_id = await requeue(redis, keys, letter, window)
        if new_id is None:
            skipped += 1
            continue
        requeued.append({**letter.as_dict(), "requeued_as": new_id})
    if as_json:
        out.write(orjson.dumps({"requeued": requeued, "skipped": skipped}).decode() + "\n")
        return 0
    for row in requeued:
        out.write(f"shard {row['shard']}: vote {row['vote_id']} requeued as {row['requeued_as']}\n")
    out.write(
        f"{len(requeued)} dead letter(s) requeued"
        + (f", {skipped} left (undecodable or already gone)" if skipped else "")
        + "\n"
    )
    return 0
