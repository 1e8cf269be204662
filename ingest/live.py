"""Live tallies: one Redis subscription per edge, fanned out to SSE clients.

The workers publish a poll's tally on the poll's channel after each commit.
Each edge process holds a single pattern subscription to all tally channels,
whatever the number of clients. For a poll that has local watchers, a tally is
turned into an SSE event once, and every watcher writes those same bytes.

A watcher never queues events: it keeps the version it sent last and, when
woken, writes the feed's latest event. A slow client skips intermediate
tallies instead of making the edge buffer them, and always ends on the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from voteflow.keys import Keys
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


def sse_event(results: dict[str, Any]) -> bytes:
    return b"event: tally\nid: %d\ndata: %s\n\n" % (results["version"], orjson.dumps(results))


class Feed:
    """The latest tally event of one poll, shared by its watchers on this edge."""

    def __init__(self, poll: Poll) -> None:
        self.poll = poll
        self.version = -1
        self.event = b""
        self.watchers = 0
        self.changed = asyncio.Event()

    def offer(self, tally: Tally) -> None:
        if tally.version <= self.version:
            return  # an older tally that arrived late
        self.version = tally.version
        self.event = sse_event(tally.results(self.poll.labels))
        # Wake everyone waiting on this generation; later waits use a new one.
        self.changed.set()
        self.changed = asyncio.Event()


class TallyHub:
    def __init__(self, redis: Redis, keys: Keys, polls: PollCache, metrics: EdgeMetrics) -> None:
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
            feed.changed.set()

    async def close(self) -> None:
        self.release_watchers()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def watch(self, poll: Poll) -> Feed:
        feed = self._feeds.get(poll.id)
        if feed is None:
            feed = self._feeds[poll.id] = Feed(poll)
        feed.watchers += 1
        self._metrics.live_subscribers.inc()
        return feed

    def unwatch(self, feed: Feed) -> None:
        feed.watchers -= 1
        self._metrics.live_subscribers.dec()
        if feed.watchers == 0:
            self._feeds.pop(feed.poll.id, None)

    async def _listen_forever(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
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
            except (RedisError, OSError) as exc:
                log.warning("tally subscription lost (%s); retrying in %.1fs", exc, backoff)
            finally:
                self.connected = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _catch_up(self) -> None:
        """After (re)subscribing, read the snapshots of watched polls: a tally
        published while the subscription was down would otherwise be missed."""
        for poll_id, feed in list(self._feeds.items()):
            raw = await self._redis.hget(  # type: ignore[misc]
                self._keys.tally(poll_id), SNAPSHOT_TALLY
            )
            if raw is not None:
                feed.offer(decode(raw))

    def _dispatch(self, message: dict[str, Any]) -> None:
        try:
            self._route(message)
        except (ValueError, KeyError, TypeError):
            # A message voteflow did not write (or a bug): drop it, keep listening.
            log.exception("dropped a malformed message on %r", message.get("channel"))

    def _route(self, message: dict[str, Any]) -> None:
        channel = message["channel"].decode()
        if message["type"] == "message":
            self._polls.invalidate(message["data"].decode())
            return
        feed = self._feeds.get(self._keys.poll_channel_id(channel))
        if feed is not None:
            feed.offer(decode(message["data"]))


async def stream(
    request: web.Request, hub: TallyHub, poll: Poll, initial: Tally, heartbeat: float
) -> web.StreamResponse:
    """Serve one SSE watcher until it leaves or the edge shuts down."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    feed = hub.watch(poll)
    try:
        feed.offer(initial)
        sent = -1
        while not hub.closing.is_set():
            if feed.version > sent:
                sent = feed.version
                await response.write(feed.event)
                continue
            changed = feed.changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=heartbeat)
            except TimeoutError:
                await response.write(HEARTBEAT)
    except ConnectionResetError:
        pass  # the watcher left
    finally:
        hub.unwatch(feed)
    return response
