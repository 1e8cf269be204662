"""Appending admitted votes to their stream shards, many requests per round trip.

Round trips: one per *batch* of requests and per Redis master, not one per
request. Requests that arrive while PIPELINES_IN_FLIGHT pipelines are in flight
wait in a list; when one returns, the flusher sends all of them as the next
batch. Under load the batches grow by themselves and Redis sees a few large
pipelines instead of thousands of small commands; when idle, a lone request
goes out at once. On a Redis Cluster a batch is split by the master that holds
each vote's shard, and the masters get their pipelines at the same time.

Each entry of a pipeline is one call of ``admit.lua``: the rate limits and the
XADD, atomically. With VOTEFLOW_REDIS_MIN_REPLICAS > 0 the pipeline ends with
WAIT (or WAITAOF) on the same connection, so that its replies come back only
once that many replicas hold the appends, like a broker's publisher confirm. A
request's future resolves only with the reply to its own script call (and its
pipeline's WAIT), so a request answers 202 only when its own append is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import TTLCache
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError

from voteflow.keys import Keys
from voteflow.message import FIELD, Vote
from voteflow.outages import REDIS_DOWN
from voteflow.redisconn import LuaScript, Nodes

from .clientip import limited_as
from .metrics import EdgeMetrics

log = logging.getLogger(__name__)

# Largest pipeline sent at once; beyond it Redis would stall other clients
# while it works through one reply, and the edge would hold a larger buffer.
MAX_PIPELINE = 1024
# Pipelines sent before the first is answered. With appendfsync always, Redis
# answers a pipeline only after its fsync; while one waits on the disk, the
# next ones are already on their way, and Redis fsyncs them together.
PIPELINES_IN_FLIGHT = 4
# Longest wait for Redis to confirm a pipeline before its requests get 503.
APPEND_TIMEOUT = 2.0
# Longest wait, in ms, for the replicas to confirm a pipeline's appends; within
# APPEND_TIMEOUT, so that a lagging replica gives a clean 503, not a timeout.
REPLICA_TIMEOUT_MS = 1000
# Consecutive failed round trips that open the breaker, and how long it stays
# open before a probe is let through.
BREAKER = "redis-append"
BREAKER_THRESHOLD = 3
BREAKER_OPEN_SECONDS = 1.0
# Seconds between two warnings that Redis is over its maxmemory.
FULL_WARNING_EVERY = 10.0
# Addresses whose limiter refused a vote for no poll, remembered until their
# wait is over: at most this many, and at most a minute (the GCRA window).
REFUSED_SIZE = 10_000
REFUSED_SECONDS = 60
# What leaves a pipeline unconfirmed: Redis away, or the breaker open.
UNCONFIRMED: tuple[type[BaseException], ...] = (OpenedState, *REDIS_DOWN)


class Limited(Exception):
    """The vote is over a rate limit; nothing was appended."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"rate limited for {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class Unavailable(Exception):
    """Redis did not confirm the append; the client should retry later."""


class _Unreplicated(RedisError):
    """Fewer replicas than VOTEFLOW_REDIS_MIN_REPLICAS confirmed a pipeline."""


class Overloaded(Exception):
    """The vote's stream shard holds its most entries; nothing was appended."""


class Reused(Exception):
    """The vote_id is queued with another ballot; nothing was appended."""


@dataclass(slots=True)
class _Request:
    keys_and_args: tuple[str | int | bytes, ...]
    done: asyncio.Future[bool]
    # On a cluster: the vote_id's claim key (Keys.vote_claim) and the digest.
    claim: tuple[str, str] | None = None


class Appender:
    def __init__(
        self,
        nodes: Nodes,
        keys: Keys,
        limit_per_ip: int,
        limit_per_voter: int,
        idempotency_window: int,
        max_backlog: int,
        min_replicas: int,
        metrics: EdgeMetrics,
        ipv6_prefix: int = 64,
    ) -> None:
        self._nodes = nodes
        self._keys = keys
        self._ipv6_prefix = ipv6_prefix
        if keys.cluster and limit_per_ip > 0:
            # An address has one limiter per shard on a cluster (see
            # Keys.rate_ip); each takes its share, so that many voters behind
            # one address get about the limit in all.
            limit_per_ip = -(-limit_per_ip // keys.shards)
        self._limits = (limit_per_ip, limit_per_voter)
        self._window = idempotency_window
        self._max_backlog = max_backlog
        self._min_replicas = min_replicas
        # WAITAOF (Redis 7.2) where every master has it: the replica has also
        # written the appends to its own append-only file. Set by start().
        self._waitaof = False
        self._metrics = metrics
        self._script = LuaScript.read(Path(__file__).parent / "admit.lua")
        self._charge_source = (Path(__file__).parent / "charge.lua").read_text()
        self._charge: AsyncScript | None = None  # registered by start()
        # limited_as(address) -> time.monotonic() until which its limiter refuses.
        self._refused: TTLCache[str, float] = TTLCache(REFUSED_SIZE, REFUSED_SECONDS)
        self._breaker = AsyncCircuitBreakerFactory(
            default_threshold=BREAKER_THRESHOLD, default_ttl=BREAKER_OPEN_SECONDS
        )
        self._full_warned_at = -FULL_WARNING_EVERY
        self._waiting: list[_Request] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, waitaof: bool = False) -> None:
        """Start flushing; `waitaof`: every master has WAITAOF."""
        self._waitaof = waitaof
        # redis-py loads it again by itself on NOSCRIPT; each call names the
        # client of the master that holds its key.
        self._charge = self._nodes.for_key(self._keys.stream(0))[1].register_script(
            self._charge_source
        )
        # Loading the script now means the first vote does not pay for it; a
        # Redis restart or a master's failover later is handled by reloading
        # on NOSCRIPT.
        with contextlib.suppress(RedisError, OSError):
            for stream in self._keys.streams():
                await self._nodes.for_key(stream)[1].script_load(self._script.source)
        self._task = asyncio.create_task(self._flush_forever(), name="appender")

    async def close(self) -> None:
        """Send what is waiting, answer it, then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while self._waiting or self._in_flight:
                    self._wakeup.set()
                    await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def append(self, vote: Vote, client_ip: str) -> bool:
        """Admit and append one vote.

        Returns True when appended, False when its vote_id was already queued
        (a retry). Raises :class:`Limited` when over a rate limit,
        :class:`Overloaded` when its shard's backlog is full, :class:`Reused`
        when its vote_id is queued with another ballot, and
        :class:`Unavailable` when Redis did not confirm the append.
        """
        shard = vote.shard(self._keys.shards)
        digest = vote.digest()
        request = _Request(
            (
                self._keys.stream(shard),
                # An IPv6 client by its /64 (VOTEFLOW_RATE_LIMIT_IPV6_PREFIX).
                self._keys.rate_ip(limited_as(client_ip, self._ipv6_prefix), shard),
                self._keys.rate_voter(vote.voter, shard),
                self._keys.vote_seen(shard, vote.vote_id),
                *self._limits,
                FIELD,
                vote.encode(),
                self._window,
                self._max_backlog,
                digest,
            ),
            asyncio.get_running_loop().create_future(),
            (self._keys.vote_claim(vote.vote_id), digest) if self._keys.cluster else None,
        )
        self._waiting.append(request)
        self._wakeup.set()
        return await request.done

    def check_refused(self, client_ip: str) -> None:
        """Raises :class:`Limited` while `client_ip`'s limiter is known to
        refuse it: it refused a vote for no poll (:meth:`charge`) less than
        its wait ago. No round trip, and no poll lookup before it.

        GCRA only moves a key's next allowed time forward, so a refusal holds
        for its whole wait, on every edge: on one Redis this refuses nothing
        admit.lua would let through. On a cluster the address has a limiter
        per shard and this one was one of them; the address waits at most
        that limiter's interval (60 s / its share of the limit) more.
        """
        address = limited_as(client_ip, self._ipv6_prefix)
        until = self._refused.get(address)
        if until is None:
            return
        left = until - time.monotonic()
        if left > 0:
            raise Limited(max(1, int(left * 1000)))
        self._refused.pop(address, None)

    async def charge(self, client_ip: str, poll_id: str) -> None:
        """Count a vote for a poll that does not exist against `client_ip`'s
        limit, as admit.lua counts a vote, so that made-up poll ids cannot be
        sent without limit (each may cost a PostgreSQL read). Raises
        :class:`Limited` when over the limit, and remembers it for
        :meth:`check_refused`.

        One round trip of its own, not in the appends' pipelines: it is a
        refusal's path, and the appender's batches stay one script per entry.
        On a cluster the limiter charged is the address's one of the shard the
        poll id hashes to, so made-up ids spread over all of its limiters.
        """
        limit = self._limits[0]
        if limit <= 0 or self._charge is None:
            return
        address = limited_as(client_ip, self._ipv6_prefix)
        shard = zlib.crc32(poll_id.encode()) % self._keys.shards
        key = self._keys.rate_ip(address, shard)
        _, client = self._nodes.for_key(key)
        try:
            wait = int(await self._charge(keys=[key], args=[limit], client=client))
        except REDIS_DOWN:
            # The vote is answered 503 (ingest.app); after a failover or a
            # moved slot, the next charge goes to the right master.
            self._nodes.refresh_soon()
            raise
        if wait > 0:
            self._refused[address] = time.monotonic() + wait / 1000
            raise Limited(wait)

    async def _flush_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                if len(self._in_flight) >= PIPELINES_IN_FLIGHT:
                    # Requests gather in the list meanwhile: the next batch grows.
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch = self._waiting[:MAX_PIPELINE]
                del self._waiting[:MAX_PIPELINE]
                task = asyncio.create_task(self._flush_answering(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def _flush_answering(self, batch: list[_Request]) -> None:
        try:
            await self._flush(batch)
        except Exception as exc:
            # Never leave a request waiting forever, and never stop flushing:
            # answer this batch 503 and go on.
            log.exception("append of %d votes failed", len(batch))
            for request in batch:
                if not request.done.done():
                    request.done.set_exception(Unavailable(str(exc)))

    async def _flush(self, batch: list[_Request]) -> None:
        self._metrics.append_batch_size.observe(len(batch))
        if self._keys.cluster:
            batch = await self._claim(batch)
        by_master: dict[str, tuple[Redis, list[_Request]]] = {}
        for request in batch:
            name, client = self._nodes.for_key(str(request.keys_and_args[0]))
            by_master.setdefault(name, (client, []))[1].append(request)
        await asyncio.gather(
            *(self._flush_to(name, client, part) for name, (client, part) in by_master.items())
        )

    async def _claim(self, batch: list[_Request]) -> list[_Request]:
        """On a cluster, before the appends: claim each vote_id for its ballot
        in the vote_id's own slot (SET NX GET), so that a vote_id reused for
        another ballot is refused whichever shard each voter's append goes
        to. One more round trip per batch, to every master at once; on one
        Redis admit.lua does it in its own. Returns the requests still to send.
        """
        by_master: dict[str, tuple[Redis, list[_Request]]] = {}
        for request in batch:
            assert request.claim is not None
            name, client = self._nodes.for_key(request.claim[0])
            by_master.setdefault(name, (client, []))[1].append(request)

        async def claim(client: Redis, part: list[_Request]) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for request in part:
                assert request.claim is not None
                key, digest = request.claim
                pipe.set(key, digest, nx=True, get=True, ex=self._window)
            try:
                async with asyncio.timeout(APPEND_TIMEOUT):
                    return list(await pipe.execute(raise_on_error=False))
            except UNCONFIRMED as exc:
                return [exc] * len(part)

        parts = list(by_master.values())
        replies = await asyncio.gather(*(claim(client, part) for client, part in parts))
        still = []
        for (_, part), answers in zip(parts, replies, strict=True):
            for request, held in zip(part, answers, strict=True):
                assert request.claim is not None
                if request.done.done():
                    continue
                if isinstance(held, BaseException):
                    request.done.set_exception(Unavailable(str(held)))
                elif held is not None and held.decode() != request.claim[1]:
                    request.done.set_exception(Reused())
                else:
                    still.append(request)
        return still

    async def _flush_to(self, master: str, client: Redis, batch: list[_Request]) -> None:
        replies: list[Any]
        try:
            # The breaker (one per master) opens after consecutive failed round
            # trips: then the requests waiting are answered 503 at once, not
            # after a timeout each, until a probe succeeds again (half-open).
            async with await self._breaker.get_breaker(f"{BREAKER}:{master}"):
                with self._metrics.append_seconds.time():
                    async with asyncio.timeout(APPEND_TIMEOUT):
                        replies = await self._send_reloading(client, batch)
        except UNCONFIRMED as exc:
            # Some of these may have been appended, but none is confirmed: the
            # client retries with the vote_id of its 503, and a vote_id is
            # queued and counted once.
            log.warning("append of %d votes to %s failed: %r", len(batch), master, exc)
            replies = [exc] * len(batch)
        full = sum(isinstance(reply, OutOfMemoryError) for reply in replies)
        if full and time.monotonic() - self._full_warned_at >= FULL_WARNING_EVERY:
            # Redis over maxmemory refuses admit.lua at its first write, before
            # it changed anything: the votes are answered 503 and not queued.
            self._full_warned_at = time.monotonic()
            log.warning("Redis %s is full (maxmemory): %d votes answered 503", master, full)
        failed = False
        for request, reply in zip(batch, replies, strict=True):
            failed = failed or isinstance(reply, BaseException)
            if request.done.done():  # the client went away
                continue
            if isinstance(reply, BaseException):
                request.done.set_exception(Unavailable(str(reply)))
            elif reply[0] == 0:
                request.done.set_exception(Limited(int(reply[1])))
            elif reply[0] == 3:
                request.done.set_exception(Overloaded())
            elif reply[0] == 4:
                request.done.set_exception(Reused())
            else:
                request.done.set_result(reply[0] == 1)
        if failed:
            # A master gone, or a slot moved (MOVED): read the slot map again.
            self._nodes.refresh_soon()

    async def _send_reloading(self, client: Redis, batch: list[_Request]) -> list[Any]:
        replies = await self._send(client, batch)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            # Redis restarted (or a replica took over) without the script:
            # load it and resend only the calls it refused (they changed
            # nothing).
            retry = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            await client.script_load(self._script.source)
            resent = await self._send(client, [batch[i] for i in retry])
            for i, reply in zip(retry, resent, strict=True):
                replies[i] = reply
        return replies

    async def _send(self, client: Redis, batch: list[_Request]) -> list[Any]:
        """One round trip; a reply per request, an exception for a failed one."""
        pipe = client.pipeline(transaction=False)
        for request in batch:
            pipe.evalsha(self._script.sha, 4, *request.keys_and_args)  # type: ignore[arg-type]
        if self._min_replicas:
            # On the pipeline's connection: waits for every write this
            # connection made, the appends above included.
            if self._waitaof:
                pipe.execute_command("WAITAOF", 0, self._min_replicas, REPLICA_TIMEOUT_MS)
            else:
                pipe.execute_command("WAIT", self._min_replicas, REPLICA_TIMEOUT_MS)
        replies = list(await pipe.execute(raise_on_error=False))
        if not self._min_replicas:
            return replies
        confirmed = replies.pop()
        if isinstance(confirmed, list):  # WAITAOF: [local fsyncs, replica fsyncs]
            confirmed = confirmed[1]
        if isinstance(confirmed, BaseException) or confirmed < self._min_replicas:
            self._metrics.unreplicated.inc()
            unheld = _Unreplicated(
                f"{confirmed} of {self._min_replicas} replicas confirmed the append"
            )
            # Appended (1) or already queued (2) but not held by enough
            # replicas: not confirmed. A refusal (0, 3) appended nothing.
            return [
                unheld if not isinstance(r, BaseException) and r[0] in (1, 2) else r
                for r in replies
            ]
        return replies
