"""The vote message: what the edge appends to a stream and a worker reads back.

A stream entry has one field, ``v``, holding the vote as compact JSON (orjson).
One field keeps the entry small and the encode/decode a single C call; the
``"f"`` member carries the format version so that a later format can be read
beside this one during a rolling deploy.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

FIELD = b"v"
FORMAT = 1

# The edge writes ids as canonical lowercase UUIDs; anything else would make
# PostgreSQL reject the whole batch, so a worker refuses it per message here.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class MessageError(ValueError):
    """A stream entry that is not a vote message voteflow can read."""


@dataclass(frozen=True, slots=True)
class Vote:
    vote_id: str
    poll_id: str
    # "u:<user_id>" or "f:<voter_fingerprint>": a fingerprint can never pose
    # as a user id that happens to have the same text.
    voter: str
    option_ids: tuple[str, ...]
    # Microseconds since the Unix epoch at which the edge received the vote:
    # the order of a voter's ballots ("later replaces earlier") is decided by it.
    received_us: int

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "f": FORMAT,
                "id": self.vote_id,
                "p": self.poll_id,
                "u": self.voter,
                "o": self.option_ids,
                "t": self.received_us,
            }
        )

    def digest(self) -> str:
        """What a retry of this vote_id must repeat: the poll, the voter and
        the options (in any order). A vote_id sent again with another digest
        is another ballot under a used vote_id, refused 409."""
        ballot = "\x00".join((self.poll_id, self.voter, *sorted(self.option_ids)))
        return hashlib.blake2b(ballot.encode(), digest_size=8).hexdigest()

    def shard(self, shards: int) -> int:
        """The stream shard of this vote.

        By voter, not by poll: one hot poll spreads over every shard (and so
        over every consumer), while one voter's ballots stay in one shard.
        """
        return zlib.crc32(self.voter.encode()) % shards


def voter_key(user_id: str | None, fingerprint: str | None) -> str:
    return f"u:{user_id}" if user_id is not None else f"f:{fingerprint}"


def decode(raw: bytes) -> Vote:
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MessageError("not a JSON object")
    if data.get("f") != FORMAT:
        raise MessageError(f"unknown message format {data.get('f')!r}")
    try:
        vote_id, poll_id, voter = data["id"], data["p"], data["u"]
        option_ids, received_us = data["o"], data["t"]
    except KeyError as exc:
        raise MessageError(f"missing member {exc.args[0]!r}") from None
    if not (
        isinstance(vote_id, str)
        and isinstance(poll_id, str)
        and isinstance(voter, str)
        and isinstance(option_ids, list)
        and all(isinstance(option, str) for option in option_ids)
        and isinstance(received_us, int)
    ):
        raise MessageError("a member has the wrong type")
    if not all(_UUID.fullmatch(value) for value in (vote_id, poll_id, *option_ids)):
        raise MessageError("an id is not a canonical UUID")
    if "\x00" in voter:
        raise MessageError("the voter holds a NUL character")
    return Vote(vote_id, poll_id, voter, tuple(option_ids), received_us)
