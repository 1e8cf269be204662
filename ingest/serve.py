"""Serving the edge: its listening socket, and the limits slow or stuck clients meet.

aiohttp already bounds a body's size (``client_max_size``) and the time an
idle keep-alive connection stays open (``keepalive_timeout``: a connection
whose next request head has not arrived that long after it opened, or after
its previous response, is closed). It has no cap on open connections and no
deadline of its own for a request head, so a client that opens thousands of
connections, or connects and trickles its headers (slowloris), holds file
descriptors and memory for up to ``keepalive_timeout`` each. This module adds
the two around aiohttp's own protocol, per process:

- at most ``max_connections`` open connections; one more is closed as soon as
  it is accepted, before a byte is read or written, so that its client (or a
  load balancer) tries again or elsewhere instead of queueing behind the stuck
  ones;
- a connection's first request head must be complete ``header_timeout``
  seconds after it opened, or the connection is closed. Later heads on a
  keep-alive connection stay bounded by ``keepalive_timeout``, as above.

Bodies get their own deadline, ``body_timeout``, where the routes read them
(:func:`read_body`). A response is never cut short; a live stream ends on
its own after VOTEFLOW_LIVE_MAX_SECONDS, and takes at most its share of the
connections (ingest.live, ingest.liveslots).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import time
from collections.abc import Sequence

from aiohttp import web

from voteflow.settings import Settings

from .validate import Invalid

log = logging.getLogger(__name__)

# Seconds in-flight requests get to finish once SIGINT or SIGTERM arrives.
SHUTDOWN_TIMEOUT = 10.0
# Connections waiting in the kernel to be accepted. A spike opens thousands at
# once: they should wait here (the kernel caps it at net.core.somaxconn), not
# be dropped and retried after a second by the clients' TCP stacks.
BACKLOG = 4096
# File descriptors a process needs besides its clients' connections: Redis and
# PostgreSQL pools, the listening socket, logs, the interpreter's own files.
FD_HEADROOM = 256
# Seconds between two warnings that connections are being refused.
REFUSAL_LOG_INTERVAL = 10.0


async def read_body(request: web.Request, seconds: float) -> bytes:
    """The request's body, refused 408 unless all of it arrives within ``seconds``."""
    if request.content.is_eof():
        # The whole body came with the head, as a vote's almost always does:
        # nothing to wait for, so no timer to arm and cancel (about 5.6 µs a
        # vote under uvloop, some 3% of the edge's CPU per vote).
        return await request.read()
    try:
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError:
        raise Invalid(408, None, f"the request body did not arrive within {seconds:g} s") from None


class _Gate:
    """The open connections of one process: how many, and how many more may open."""

    def __init__(self, server: web.Server, settings: Settings) -> None:
        self.server = server  # aiohttp's protocol factory
        self.header_timeout = settings.header_timeout
        self.limit = settings.max_connections
        self.open = 0
        self._refused = 0
        self._reported_at = -REFUSAL_LOG_INTERVAL

    def admit(self) -> bool:
        if self.open < self.limit:
            self.open += 1
            return True
        self._refused += 1
        now = time.monotonic()
        if now - self._reported_at >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %d connection(s): %d are open, VOTEFLOW_MAX_CONNECTIONS allows %d",
                self._refused, self.open, self.limit,
            )  # fmt: skip
            self._refused = 0
            self._reported_at = now
        return False

    def release(self) -> None:
        self.open -= 1


class _Connection(asyncio.Protocol):
    """One accepted connection: counted, given a deadline for its first request
    head, and otherwise handed to aiohttp's protocol.

    This wraps aiohttp's protocol rather than subclassing it, and speaks to it
    only through the asyncio Protocol interface that the event loop itself
    uses, so nothing here depends on aiohttp's internals. Counting starts in
    connection_made and ends in connection_lost, which asyncio calls exactly
    once after it.

    Where aiohttp parses the head is private, so the deadline watches the
    bytes: a head ends at its first empty line (RFC 9112, section 2.1), and
    empty lines before the request line do not count (section 2.2). Only the
    first head is watched; from then on each chunk is passed straight through.
    """

    __slots__ = ("_deadline", "_gate", "_inner", "_tail")

    def __init__(self, gate: _Gate) -> None:
        self._gate = gate
        self._inner: asyncio.Protocol | None = None  # None: refused
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes of the head so far, to find its end across chunks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._gate.admit():
            transport.close()
            return
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._gate.header_timeout, transport.close)
        self._inner = self._gate.server()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._deadline is not None:
            seen = self._tail + data if self._tail else data.lstrip(b"\r\n")
            if b"\n\n" in seen or b"\n\r\n" in seen:
                self._deadline.cancel()
                self._deadline = None
            else:
                self._tail = seen[-2:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self._gate.release()
        self._inner.connection_lost(exc)


def _raise_fd_limit(wanted: int) -> None:
    """Let the process hold ``wanted`` descriptors, so that the connection cap,
    not a failing accept() or Redis connect, is what a flood of clients meets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning(
            "the open-file limit (%d) is below VOTEFLOW_MAX_CONNECTIONS plus %d: "
            "raise it (ulimit -n) or lower VOTEFLOW_MAX_CONNECTIONS",
            hard, FD_HEADROOM,
        )  # fmt: skip


async def _serve(
    app: web.Application, settings: Settings, sockets: Sequence[socket.socket] | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=settings.keepalive_timeout,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()  # on_startup and cleanup_ctx: Redis, PostgreSQL, the hub
    try:
        assert runner.server is not None  # set by setup()
        gate = _Gate(runner.server, settings)
        if sockets is None:
            listeners = [
                await loop.create_server(
                    lambda: _Connection(gate), settings.host, settings.port, backlog=BACKLOG
                )
            ]
        else:  # opened by the supervisor (ingest.prefork), shared with the other processes
            listeners = [
                await loop.create_server(lambda: _Connection(gate), sock=sock, backlog=BACKLOG)
                for sock in sockets
            ]
        try:
            log.info(
                "edge listening on http://%s:%d (at most %d connections)",
                settings.host, settings.port, settings.max_connections,
            )  # fmt: skip
            await stop.wait()
        finally:
            for listener in listeners:
                listener.close()  # accept no more connections
    finally:
        # As web.run_app does: close idle connections, run on_shutdown (which
        # ends live streams), give requests in flight SHUTDOWN_TIMEOUT seconds,
        # then run the cleanup_ctx exits.
        await runner.cleanup()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def serve(
    app: web.Application, settings: Settings, sockets: Sequence[socket.socket] | None = None
) -> None:
    """Run the edge on settings.host:settings.port (or on listening ``sockets``
    it was given) until SIGINT or SIGTERM, then stop accepting, finish the
    requests in flight and close its resources."""
    import uvloop

    _raise_fd_limit(settings.max_connections + FD_HEADROOM)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(app, settings, sockets))
