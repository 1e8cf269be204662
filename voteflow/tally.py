"""A poll's tallies as the workers publish them and the edges read them.

Workers write each poll's latest tally to a snapshot key and publish it on the
poll's channel after every commit that touched the poll. ``version`` grows with
every committed change, so a reader keeps the highest version it has seen and
drops an older one that arrives late.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .timeutil import from_us

# The snapshot key is a hash: the version alone (compared by the publishing
# script without decoding JSON) and the encoded tally.
SNAPSHOT_VERSION = "version"
SNAPSHOT_TALLY = "tally"


@dataclass(frozen=True, slots=True)
class Tally:
    poll_id: str
    version: int
    total_ballots: int
    # option id -> votes, in the poll's option order
    votes: dict[str, int]
    as_of_us: int

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "p": self.poll_id,
                "v": self.version,
                "n": self.total_ballots,
                "o": self.votes,
                "t": self.as_of_us,
            }
        )

    def results(self, labels: dict[str, str]) -> dict[str, Any]:
        """The body of ``GET /api/polls/{id}/results`` and of each live event."""
        return {
            "poll_id": self.poll_id,
            "options": [
                {"id": id_, "label": label, "votes": self.votes.get(id_, 0)}
                for id_, label in labels.items()
            ],
            "total_ballots": self.total_ballots,
            "version": self.version,
            "as_of": from_us(self.as_of_us),
        }


def decode(raw: bytes | str) -> Tally:
    data = orjson.loads(raw)
    return Tally(data["p"], data["v"], data["n"], data["o"], data["t"])
