"""Live tallies: Redis subscriptions per edge, fanned out to SSE clients.

The workers publish a poll's tally on the poll's channel after each commit.
On one Redis, each edge process holds a single pattern subscription to all
tally channels, whatever the number of clients. On a Redis Cluster the
channels are sharded (SPUBLISH, Redis 7): a channel's messages stay on the
master that holds its slot instead of crossing the whole cluster, and an edge
subscribes (SSUBSCRIBE), on each master, to the channels of the polls it has
watchers for. For a poll that has local watchers, a tally is turned into an SSE
event once, and every watcher writes those same bytes.

Watchers follow the feed over SSE or a WebSocket, with the same tally
messages, at most VOTEFLOW_LIVE_UPDATES_PER_SECOND times a second. An SSE
watcher costs the edge no coroutine per update: its feed writes the event,
framed once for all, into every SSE watcher's socket from one loop (the
handler of each only waits for its stream to end). A WebSocket watcher has a
coroutine of its own, woken per update. A watcher never queues events: a
slow client whose unsent bytes pass HIGH_WATER skips intermediate tallies
instead of making the edge buffer them, always ends on the latest, and is
dropped if it stays behind VOTEFLOW_LIVE_WRITE_TIMEOUT.

A stream lasts VOTEFLOW_LIVE_MAX_SECONDS at most (less up to a tenth, at
random, so that watchers who came together do not all leave together); then
the edge ends it (the SSE response ends, the WebSocket is closed with 1000).
Its client reconnects, and the first message of the new stream is the current
tally: nothing is lost, and a watcher that never reads cannot keep its
connection forever. ingest.liveslots bounds how many streams are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import WSMsgType, hdrs, web
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from voteflow.keys import Keys
from voteflow.outages import REDIS_DOWN
from voteflow.redisconn import AnyRedis, ClusterClient
from voteflow.tally import SNAPSHOT_TALLY, Tally, decode

from .metrics import EdgeMetrics
from .polls import Poll, PollCache

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # nginx and similar proxies must pass events through at once.
    "X-Accel-Buffering": "no",
}
HEARTBEAT = b": keep-alive\n\n"
# Bytes a watcher's socket may hold unsent before the watcher counts as
# behind: it gets nothing more until it drains (then the latest tally), and is
# dropped once behind for VOTEFLOW_LIVE_WRITE_TIMEOUT. aiohttp's own writer
# waits for a socket at the same mark.
HIGH_WATER = 64 * 1024
# SSE watchers written to between two chances for other work (votes) to run.
# With 10,000 watchers on one edge (bench stage 8), votes' p99 was 134 ms
# unsliced, 105-126 ms in slices of 500, 35-42 ms in slices of 100.
BROADCAST_SLICE = 100
# Seconds a master's subscriber waits for a message before it looks for new
# channels to subscribe to (polls that got their first watcher meanwhile).
RESUBSCRIBE_EVERY = 0.05
# A stream's lifetime is cut short by up to this share of
# VOTEFLOW_LIVE_MAX_SECONDS, at random: watchers who connected together (after
# a deploy, say) then reconnect spread out, not all at once.
LIFETIME_JITTER = 0.1


def _chunk(data: bytes) -> bytes:
    """`data` as one chunk of HTTP/1.1 chunked transfer coding (RFC 9112 7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


HEARTBEAT_CHUNK = _chunk(HEARTBEAT)


class _SseSink:
    """One SSE watcher, as its feed sees it: the socket to write to, how to
    frame an event for it, the last version it was sent, and since when it is
    behind."""

    __slots__ = ("behind_since", "chunked", "done", "sent", "transport")

    def __init__(self, transport: asyncio.Transport, chunked: bool) -> None:
        self.transport = transport
        self.chunked = chunked
        self.sent = -1
        self.behind_since: float | None = None
        # Set when the stream is over: the watcher left, was dropped, or the
        # edge shuts down. The watcher's handler waits on it.
        self.done = asyncio.Event()


class Feed:
    """The latest tally of one poll, encoded once for all its watchers on this
    edge: as an SSE event (plain and chunked) and as a WebSocket text message.

    The feed sends to its watchers at most once per `interval`, with whatever
    tally is latest then: at a spike a poll commits many times a second, and
    writing to thousands of watchers per commit would take the edge's CPU.
    After `heartbeat` seconds without a tally it sends a heartbeat, so that no
    watcher keeps a timer of its own. SSE watchers are written to by the feed
    itself (``_broadcast``); WebSocket watchers are woken (``changed``).
    """

    def __init__(
        self,
        poll: Poll,
        interval: float,
        heartbeat: float,
        write_timeout: float,
        on_drop: Callable[[], None],
    ) -> None:
        self.poll = poll
        self.version = -1
        self.event = b""
        self.chunk = b""  # self.event as one HTTP/1.1 chunk
        self.message = b""
        self.watchers = 0
        self.beats = 0  # heartbeats due so far
        self.changed = asyncio.Event()
        self._sinks: dict[_SseSink, None] = {}  # in the order they joined
        self._behind = 0  # SSE watchers not sent the latest tally at the last send
        self._write_timeout = write_timeout
        self._on_drop = on_drop
        self._dirty = asyncio.Event()
        self._pacer = asyncio.create_task(self._pace(interval, heartbeat), name=f"feed-{poll.id}")

    def offer(self, tally: Tally) -> None:
        if tally.version <= self.version:
            return  # an older tally that arrived late
        self.version = tally.version
        results = tally.results(self.poll.labels)
        self.message = orjson.dumps(results)
        self.event = b"event: tally\nid: %d\ndata: %s\n\n" % (tally.version, self.message)
        self.chunk = _chunk(self.event)
        self._dirty.set()

    def join(self, sink: _SseSink) -> None:
        """Add an SSE watcher, and send it the latest tally at once."""
        self._sinks[sink] = None
        self._send(sink, asyncio.get_running_loop().time(), beat=False)

    def leave(self, sink: _SseSink) -> None:
        self._sinks.pop(sink, None)
        sink.done.set()

    def end_all(self) -> None:
        for sink in list(self._sinks):
            self.leave(sink)

    def wake(self) -> None:
        # Wake every WebSocket watcher waiting on this generation; later waits
        # use a new one.
        self.changed.set()
        self.changed = asyncio.Event()

    async def _broadcast(self, beat: bool) -> None:
        # One loop over every SSE watcher of the poll, the same bytes for all:
        # a transport write each, no coroutine woken per watcher. In slices,
        # so that votes arriving meanwhile wait for one slice, not for all.
        loop = asyncio.get_running_loop()
        now = loop.time()
        behind = 0
        sinks = list(self._sinks)
        for start in range(0, len(sinks), BROADCAST_SLICE):
            if start:
                await asyncio.sleep(0)
            for sink in sinks[start : start + BROADCAST_SLICE]:
                if sink in self._sinks and not self._send(sink, now, beat):
                    behind += 1
        self._behind = behind

    def _send(self, sink: _SseSink, now: float, beat: bool) -> bool:
        """Send `sink` the latest tally, or a heartbeat if it has it; False
        when it is behind and got nothing."""
        transport = sink.transport
        if transport.is_closing():  # the watcher left
            self.leave(sink)
            return True
        if transport.get_write_buffer_size() > HIGH_WATER:
            if sink.behind_since is None:
                sink.behind_since = now
            elif now - sink.behind_since >= self._write_timeout:
                # Its socket stayed full: drop it, without waiting to flush.
                # Its client reconnects and gets the latest tally first.
                self._on_drop()
                transport.abort()
                self.leave(sink)
                return True
            return False
        sink.behind_since = None
        if sink.sent < self.version:
            transport.write(self.chunk if sink.chunked else self.event)
            sink.sent = self.version
        elif beat:
            transport.write(HEARTBEAT_CHUNK if sink.chunked else HEARTBEAT)
        return True

    async def _pace(self, interval: float, heartbeat: float) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + heartbeat
        while True:
            wait = next_beat - loop.time()
            if self._behind:
                # Someone missed the latest tally: try again at the pace of
                # updates, not only at the next tally or heartbeat.
                wait = min(wait, interval)
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    await self._dirty.wait()
            except TimeoutError:
                if loop.time() >= next_beat:
                    self.beats += 1
                    next_beat = loop.time() + heartbeat
                    self.wake()
                    await self._broadcast(beat=True)
                else:
                    await self._broadcast(beat=False)
                continue
            self._dirty.clear()
            next_beat = loop.time() + heartbeat
            self.wake()
            await self._broadcast(beat=False)
            await asyncio.sleep(interval)

    def close(self) -> None:
        self._pacer.cancel()


class TallyHub:
    def __init__(
        self,
        redis: AnyRedis,
        keys: Keys,
        polls: PollCache,
        metrics: EdgeMetrics,
        interval: float,
        heartbeat: float,
        write_timeout: float,
        sharded: bool = False,
    ) -> None:
        # sharded: on a cluster whose masters have sharded pub/sub.
        self._sharded = sharded
        self._interval = interval
        self._heartbeat = heartbeat
        self._write_timeout = write_timeout
        self._redis = redis
        self._keys = keys
        self._polls = polls
        self._metrics = metrics
        self._feeds: dict[str, Feed] = {}
        self._task: asyncio.Task[None] | None = None
        self.closing = asyncio.Event()
        self.connected = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="tally-hub")

    def release_watchers(self) -> None:
        """End every live stream (the edge is shutting down)."""
        self.closing.set()
        for feed in self._feeds.values():
            feed.wake()
            feed.end_all()

    async def close(self) -> None:
        self.release_watchers()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def watch(self, poll: Poll) -> Feed:
        feed = self._feeds.get(poll.id)
        if feed is None:
            feed = self._feeds[poll.id] = Feed(
                poll, self._interval, self._heartbeat, self._write_timeout, self.slow_watcher
            )
        feed.watchers += 1
        self._metrics.live_subscribers.inc()
        return feed

    def slow_watcher(self) -> None:
        self._metrics.live_dropped.inc()

    def unwatch(self, feed: Feed) -> None:
        feed.watchers -= 1
        self._metrics.live_subscribers.dec()
        if feed.watchers == 0:
            self._feeds.pop(feed.poll.id, None)
            feed.close()

    async def _listen_forever(self) -> None:
        redis = self._redis
        if isinstance(redis, Redis):
            await self._listen_to_server(redis)
        else:
            await self._listen_to_cluster(redis)

    async def _listen_to_server(self, redis: Redis) -> None:
        backoff = 0.1
        while True:
            pubsub = redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self._keys.tally_channel_pattern())
                await pubsub.subscribe(self._keys.polls_changed_channel())
                self.connected = True
                backoff = 0.1
                await self._catch_up()
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None:
                        self._dispatch(message)
            except REDIS_DOWN as exc:
                log.warning("tally subscription lost (%s); retrying in %.1fs", exc, backoff)
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _listen_to_cluster(self, cluster: RedisCluster) -> None:
        """A subscriber per master; when one fails (a master died, a slot
        moved), read the slot map again and start them all over."""
        backoff = 0.1
        while True:
            followers: list[asyncio.Task[None]] = []
            try:
                if isinstance(cluster, ClusterClient):
                    await cluster.refresh()
                else:
                    await cluster.nodes_manager.initialize()
                masters = cluster.get_primaries()
                followers = [
                    asyncio.create_task(self._follow_master(cluster, m.host, int(m.port), i == 0))
                    for i, m in enumerate(masters)
                ]
                self.connected = True
                await self._catch_up()
                done, _ = await asyncio.wait(followers, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # raises what ended it
            except REDIS_DOWN as exc:
                log.warning("tally subscription lost (%s); retrying in %.1fs", exc, backoff)
            except Exception:
                # Never stop listening: live watchers would silently freeze.
                log.exception("tally subscription failed; retrying in %.1fs", backoff)
            else:
                backoff = 0.1
            finally:
                self.connected = False
                for task in followers:
                    task.cancel()
                await asyncio.gather(*followers, return_exceptions=True)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _follow_master(
        self, cluster: RedisCluster, host: str, port: int, announcements: bool
    ) -> None:
        """Subscribe on one master to the tally channels it holds of the polls
        watched here, as they come and go; the first master also carries the
        poll announcements (a plain PUBLISH reaches every node)."""
        client = Redis(host=host, port=port, socket_connect_timeout=2)
        pubsub = client.pubsub()
        subscribed: set[str] = set()
        name = f"{host}:{port}"
        try:
            if announcements:
                await pubsub.subscribe(self._keys.polls_changed_channel())
                if not self._sharded:
                    await pubsub.psubscribe(self._keys.tally_channel_pattern())
            elif not self._sharded:
                await asyncio.Event().wait()  # nothing for this master to carry
                return
            while True:
                if self._sharded:
                    await self._resubscribe(cluster, pubsub, name, subscribed)
                if pubsub.connection is None:  # nothing subscribed here yet
                    await asyncio.sleep(RESUBSCRIBE_EVERY)
                    continue
                message = await pubsub.get_message(timeout=RESUBSCRIBE_EVERY)
                if message is None:
                    continue
                if message["type"] == "sunsubscribe":
                    # The master gave the channel's slot away: start over.
                    raise RedisError(f"{name} no longer holds {message['channel']!r}")
                if message["type"] in ("message", "pmessage", "smessage"):
                    self._dispatch(message)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _resubscribe(
        self, cluster: RedisCluster, pubsub: Any, master: str, subscribed: set[str]
    ) -> None:
        wanted = {}
        for poll_id in self._feeds:
            channel = self._keys.tally_channel(poll_id)
            node = cluster.get_node_from_key(channel)
            if node is not None and node.name == master:
                wanted[channel] = poll_id
        for channel in wanted.keys() - subscribed:
            await pubsub.execute_command("SSUBSCRIBE", channel)
            subscribed.add(channel)
            # A tally published before the subscription took hold is read here.
            await self._catch_up_poll(wanted[channel])
        for channel in subscribed - wanted.keys():
            await pubsub.execute_command("SUNSUBSCRIBE", channel)
            subscribed.discard(channel)

    async def _catch_up(self) -> None:
        """After (re)subscribing, read the snapshots of watched polls: a tally
        published while the subscription was down would otherwise be missed."""
        for poll_id in list(self._feeds):
            await self._catch_up_poll(poll_id)

    async def _catch_up_poll(self, poll_id: str) -> None:
        raw = await self._redis.hget(self._keys.tally(poll_id), SNAPSHOT_TALLY)  # type: ignore[misc]
        feed = self._feeds.get(poll_id)
        if raw is not None and feed is not None:
            feed.offer(decode(raw))

    def _dispatch(self, message: dict[str, Any]) -> None:
        try:
            self._route(message)
        except (ValueError, KeyError, TypeError):
            # A message voteflow did not write (or a bug): drop it, keep listening.
            log.exception("dropped a malformed message on %r", message.get("channel"))

    def _route(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        if channel == self._keys.polls_changed_channel():
            self._polls.invalidate(message["data"].decode())
            return
        feed = self._feeds.get(self._keys.poll_channel_id(channel))
        if feed is not None:
            feed.offer(decode(message["data"]))


@dataclass(frozen=True, slots=True)
class Pace:
    """How long a watcher may leave a write unread, and how long its stream
    lasts at most (the rate of updates and the heartbeat are the feed's)."""

    write_timeout: float  # seconds
    lifetime: float  # seconds


class Transport(Protocol):
    async def send(self, feed: Feed) -> None: ...
    async def beat(self) -> None: ...


async def follow(
    hub: TallyHub,
    poll: Poll,
    initial: Tally,
    transport: Transport,
    pace: Pace,
    gone: asyncio.Event,
) -> None:
    """Send the poll's tallies to one WebSocket watcher until it is `gone`, too
    slow, its lifetime is over, or the edge shuts down: the current one at
    once, then the latest each time the feed wakes. (SSE watchers are written
    to by their feed: ``stream``.)"""
    feed = hub.watch(poll)
    # One timer per watcher for its whole life. Writes hand their bytes to the
    # transport before they wait, so ending one mid-wait cuts no event short.
    lifetime = asyncio.timeout(pace.lifetime * (1 - LIFETIME_JITTER * random.random()))
    try:
        async with lifetime:
            feed.offer(initial)
            sent, beats = -1, feed.beats
            while not hub.closing.is_set() and not gone.is_set():
                # The generation to wait on is taken before writing: a wake
                # while the write is under way is not missed, and nothing is
                # sent between two wakes (which keep the pace).
                changed = feed.changed
                if feed.version > sent:
                    sent = feed.version
                    # asyncio.timeout, not wait_for: no task per write, and an
                    # update is as many writes as there are watchers.
                    async with asyncio.timeout(pace.write_timeout):
                        await transport.send(feed)
                elif feed.beats > beats:
                    beats = feed.beats
                    async with asyncio.timeout(pace.write_timeout):
                        await transport.beat()
                await _either(gone, changed)
    except TimeoutError:
        if not lifetime.expired():  # a write's timeout, not the lifetime's
            hub.slow_watcher()  # its socket buffer stayed full: drop it
    except (ConnectionResetError, ConnectionError):
        pass  # the watcher left
    finally:
        hub.unwatch(feed)


async def _either(gone: asyncio.Event, changed: asyncio.Event) -> None:
    """Wait for `changed`, or for `gone` if it is set first."""
    waits = [asyncio.ensure_future(gone.wait()), asyncio.ensure_future(changed.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


class _WebSocket:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    async def send(self, feed: Feed) -> None:
        # The bytes encoded once for every watcher, sent as a text frame.
        await self._ws.send_frame(feed.message, WSMsgType.TEXT)

    async def beat(self) -> None:
        await self._ws.ping()


async def stream(
    request: web.Request, hub: TallyHub, poll: Poll, initial: Tally, pace: Pace
) -> web.StreamResponse:
    """Serve one SSE watcher until it leaves, is dropped, its lifetime is
    over, or the edge shuts down. Its feed writes its events (Feed.join)."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    # A StreamResponse sends its head at prepare(): what the feed writes to
    # the socket after it is the body. The response's own writer is not used
    # until aiohttp ends the body (the last chunk) after this returns.
    await response.prepare(request)
    transport = request.transport
    if transport is None or hub.closing.is_set():
        return response
    # The head sent says whether the body is chunked (HTTP/1.1) or not (1.0).
    chunked = response.headers.get(hdrs.TRANSFER_ENCODING, "").lower() == "chunked"
    sink = _SseSink(transport, chunked)
    feed = hub.watch(poll)
    try:
        async with asyncio.timeout(pace.lifetime * (1 - LIFETIME_JITTER * random.random())):
            feed.offer(initial)
            feed.join(sink)
            await sink.done.wait()
    except TimeoutError:
        pass  # its lifetime is over: the client reconnects to the latest tally
    finally:
        feed.leave(sink)
        hub.unwatch(feed)
    return response


async def websocket(
    request: web.Request, hub: TallyHub, poll: Poll, initial: Tally, pace: Pace
) -> web.WebSocketResponse:
    """Serve one WebSocket watcher: the same tally messages, one per text frame."""
    ws = web.WebSocketResponse(autoping=True, max_msg_size=1024)
    await ws.prepare(request)
    gone = asyncio.Event()

    async def read() -> None:
        # Reading lets aiohttp answer pings and see the close; what a client
        # sends is not used.
        try:
            async for _ in ws:
                pass
        finally:
            gone.set()

    reader = asyncio.create_task(read())
    try:
        await follow(hub, poll, initial, _WebSocket(ws), pace, gone)
    finally:
        await ws.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return ws
