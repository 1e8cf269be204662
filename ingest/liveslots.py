"""Who may open a live stream: at most so many per client address, and so many
in all, per edge process.

A live stream (SSE or WebSocket) holds its connection for as long as its
client wants, and reading nothing costs the client nothing. Without a bound,
one address could hold every connection an edge may open
(``VOTEFLOW_MAX_CONNECTIONS``) and voters would be refused. So:

- an address holds at most ``VOTEFLOW_LIVE_MAX_PER_ADDRESS`` streams, counted
  as the per-IP rate limit counts it (``ingest.clientip.limited_as``: an IPv6
  client by its /64); one more is answered 429;
- all live streams together hold at most ``live_connections`` (half of
  ``VOTEFLOW_MAX_CONNECTIONS`` unless ``VOTEFLOW_LIVE_MAX_CONNECTIONS`` says
  otherwise); one more is answered 503, and the rest of the connections stay
  for ballots and everything else.

Both answers carry ``Retry-After``. The counts are in-process and exact: a
stream is counted from before its poll is looked up until its handler ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .longlived import LongLived
from .metrics import EdgeMetrics
from .validate import Invalid

# Seconds a refused watcher should wait: long enough that a crowd retrying
# does not hammer the edge, short enough for a dashboard to come back soon.
RETRY_AFTER = 10


class LiveSlots:
    def __init__(self, per_address: int, total: int, metrics: EdgeMetrics) -> None:
        self.per_address = per_address
        self.total = total
        self.open = 0
        self._metrics = metrics
        self._by_address: dict[str, int] = {}  # only addresses holding a stream
        self._long_lived = LongLived()

    @contextlib.contextmanager
    def hold(self, address: str) -> Iterator[None]:
        """One live stream of `address` for the duration of the block; raises
        Invalid (429 or 503) when there is no slot for it."""
        held = self._by_address.get(address, 0)
        if held >= self.per_address:
            self._metrics.live_refused.labels("per_address").inc()
            raise Invalid(
                429,
                None,
                f"at most {self.per_address} live streams per client address; close one first",
                {"Retry-After": str(RETRY_AFTER)},
            )
        if self.open >= self.total:
            self._metrics.live_refused.labels("busy").inc()
            raise Invalid(
                503,
                None,
                "this edge holds all the live streams it may; retry shortly",
                {"Retry-After": str(RETRY_AFTER)},
            )
        self.open += 1
        self._by_address[address] = held + 1
        self._long_lived.opened(self.open)
        try:
            yield
        finally:
            self.open -= 1
            self._long_lived.closed(self.open)
            left = self._by_address[address] - 1
            if left:
                self._by_address[address] = left
            else:
                del self._by_address[address]
