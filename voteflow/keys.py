"""Every Redis key and channel name voteflow uses, in one place.

Each name carries a Redis Cluster hash tag (the part in braces) so that moving
to a cluster needs no key change: a stream shard and its dead-letter stream
share a slot; tally keys are tagged by poll; rate-limit keys by their subject.
"""

from __future__ import annotations

from dataclasses import dataclass

# The consumer group every worker joins on every shard.
GROUP = "writers"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str
    shards: int

    def stream(self, shard: int) -> str:
        return f"{self.prefix}:votes:{{s{shard}}}"

    def dead_letters(self, shard: int) -> str:
        return f"{self.prefix}:dead:{{s{shard}}}"

    def streams(self) -> list[str]:
        return [self.stream(shard) for shard in range(self.shards)]

    def tally(self, poll_id: str) -> str:
        """The latest published tally snapshot of a poll (JSON, with its version)."""
        return f"{self.prefix}:tally:{{{poll_id}}}"

    def tally_channel(self, poll_id: str) -> str:
        return f"{self.prefix}:tallies:{{{poll_id}}}"

    def tally_channel_pattern(self) -> str:
        return f"{self.prefix}:tallies:*"

    def poll_channel_id(self, channel: str) -> str:
        """The poll id named by a tally channel."""
        return channel[len(self.prefix) + len(":tallies:{") : -1]

    def polls_changed_channel(self) -> str:
        """Edges drop their cached copy of the poll named in a message here."""
        return f"{self.prefix}:polls-changed"

    def vote_seen(self, shard: int, poll_id: str, vote_id: str) -> str:
        """Marks a vote_id as queued; in its stream shard's slot."""
        return f"{self.prefix}:seen:{{s{shard}}}:{poll_id}:{vote_id}"

    def rate_ip(self, ip: str) -> str:
        return f"{self.prefix}:rl:{{ip:{ip}}}"

    def rate_voter(self, voter: str) -> str:
        return f"{self.prefix}:rl:{{voter:{voter}}}"

    def arq_queue(self) -> str:
        return f"{self.prefix}:arq:queue"

    def arq_health(self) -> str:
        return f"{self.prefix}:arq:health-check"
