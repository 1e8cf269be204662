"""Every Redis key and channel name voteflow uses, in one place.

Each name carries a Redis Cluster hash tag (the part in braces), so that the
keys one script or one transaction touches share a slot on a cluster:

- a stream shard, its dead letters, the idempotency keys of its votes and the
  rate-limit keys of the votes appended to it share the shard's tag;
- a poll's tally snapshot and its live channel share the poll's tag;
- arq's keys (the reclaim job's queue and job keys) share one tag.

The shards' tags are chosen so that their slots are spread evenly over the
16,384 slots of a cluster, and so over its masters (`voteflow status` shows
which shard lives on which node).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

# The consumer group every worker joins on every shard.
GROUP = "writers"


def consumer(host: str, pid: int, tag: str) -> str:
    """A worker's consumer name in GROUP: its host and process id, and a tag
    that sets apart two workers of one process (tests run them so)."""
    return f"{host}:{pid}:{tag}"


def consumer_of(name: str | bytes, pid: int) -> bool:
    """Whether a consumer (as XINFO CONSUMERS names it) is process `pid`'s."""
    text = name.decode() if isinstance(name, bytes) else name
    return text.split(":")[1:2] == [str(pid)]


def shard_tag(shard: int, shards: int) -> str:
    """The hash tag of a stream shard: "s<shard>", or "s<shard>.<n>" for the
    first n whose slot is nearest the middle of the shard's 1/shards of the
    slot space. With the slots split evenly among masters (as `redis-cli
    --cluster create` does), every master then holds its share of shards;
    "s0" to "s7" alone would put four of eight shards on one of three masters.
    """
    band = REDIS_CLUSTER_HASH_SLOTS / shards
    middle = (shard + 0.5) * band
    candidates = itertools.chain([f"s{shard}"], (f"s{shard}.{n}" for n in range(1, 4096)))
    best, distance = "", float("inf")
    for tag in candidates:
        off = abs(key_slot(tag.encode()) - middle)
        if off < distance:
            best, distance = tag, off
        if distance <= band / 8:  # near enough: stop at the first such tag
            break
    return best


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str
    shards: int
    # On a Redis Cluster a script's keys must share a slot: see rate_ip.
    cluster: bool = False
    _tags: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_tags", tuple(shard_tag(i, self.shards) for i in range(self.shards))
        )

    def tag(self, shard: int) -> str:
        return self._tags[shard]

    def stream(self, shard: int) -> str:
        return f"{self.prefix}:votes:{{{self._tags[shard]}}}"

    def dead_letters(self, shard: int) -> str:
        return f"{self.prefix}:dead:{{{self._tags[shard]}}}"

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

    def vote_seen(self, shard: int, vote_id: str) -> str:
        """A vote_id queued, holding its ballot's digest (Vote.digest) for the
        idempotency window; admit.lua reads and sets it with the append.

        On one Redis it is one key per vote_id, whatever the shard, so a
        vote_id reused for another ballot is found wherever its voter's shard
        is. On a cluster it must share the shard's slot with the append; the
        vote_id's own claim (vote_claim) then finds a reuse across shards.
        """
        if self.cluster:
            return f"{self.prefix}:seen:{{{self._tags[shard]}}}:{vote_id}"
        return f"{self.prefix}:seen:{vote_id}"

    def vote_claim(self, vote_id: str) -> str:
        """On a cluster: a vote_id's ballot digest, in the vote_id's own slot,
        claimed by the edge before the append (ingest.append)."""
        return f"{self.prefix}:vid:{{{vote_id}}}"

    def rate_ip(self, ip: str, shard: int) -> str:
        """The per-address limiter of a vote appended to `shard`.

        `ip` is what the limit counts the client as (ingest.clientip.limited_as):
        an IPv4 address, or an IPv6 client's network such as ``2001:db8::/64``.

        On one Redis it is one key per address. On a cluster it must share the
        shard's slot with the append, so an address has one limiter per shard
        (and the edge gives each 1/shards of the limit, see ingest.append).
        """
        if self.cluster:
            return f"{self.prefix}:rl:{{{self._tags[shard]}}}:ip:{ip}"
        return f"{self.prefix}:rl:ip:{ip}"

    def rate_voter(self, voter: str, shard: int) -> str:
        # A voter's ballots all go to one shard (voteflow.message.Vote.shard),
        # so one key per voter in that shard's slot: exact on a cluster too.
        return f"{self.prefix}:rl:{{{self._tags[shard]}}}:voter:{voter}"

    def arq_tag(self) -> str:
        """arq's keys are its queue, health check and per-job keys; on a
        cluster arq talks to the one node that holds this tag's slot."""
        return f"{{{self.prefix}:arq}}"

    def arq_queue(self) -> str:
        return f"{self.arq_tag()}:queue"

    def arq_aborted(self) -> str:
        return f"{self.arq_tag()}:aborted"

    def arq_health(self) -> str:
        return f"{self.arq_tag()}:health-check"
