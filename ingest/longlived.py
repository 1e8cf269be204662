"""Keeping CPython's full garbage collections off the objects of live streams.

Each live stream holds a few dozen objects for as long as it is open (its
request, response, transport, protocol, task, sink). A full collection walks
every tracked object of the process, so with thousands of watchers it stops
the edge for hundreds of milliseconds, and every vote in flight waits (the
figures are in docs/api.md, "Live streams"). Those objects are not garbage:
``gc.freeze()`` moves every object tracked so far into a permanent
generation that collections skip, while reference counting still frees each
one when its stream ends.

- After every FREEZE_EVERY new streams, a young collection (so that fresh
  garbage is not frozen) and a freeze.
- ``gc.unfreeze()`` when the streams open fall under half of those open at
  the last freeze (the audience left), or once as many streams have closed
  since the first freeze as were open at the last one (the audience turned
  over: watchers reconnect at least every VOTEFLOW_LIVE_MAX_SECONDS):
  whatever died in a reference cycle meanwhile goes back to the collector,
  which frees it at its next full collection. Frozen garbage is thus bounded
  by about one audience's worth, and the price is one full collection per
  turnover instead of many while an audience joins.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

# New streams between two freezes: a freeze costs a young collection
# (about a millisecond); a full collection over 500 streams' objects, a few.
FREEZE_EVERY = 500


class LongLived:
    """Told of each live stream opening and closing (with how many are open
    then), freezes and unfreezes."""

    def __init__(self, every: int = FREEZE_EVERY) -> None:
        self.every = every
        self.frozen_at = 0  # streams open at the last freeze; 0: none frozen
        self._since = 0  # streams opened since the last freeze
        self._closed = 0  # streams closed since the first freeze

    def opened(self, open_now: int) -> None:
        self._since += 1
        if self._since >= self.every:
            self._since = 0
            gc.collect(1)
            gc.freeze()
            self.frozen_at = open_now
            log.debug("froze %d objects, %d live streams open", gc.get_freeze_count(), open_now)

    def closed(self, open_now: int) -> None:
        if not self.frozen_at:
            return
        self._closed += 1
        if open_now < self.frozen_at // 2 or self._closed >= self.frozen_at:
            gc.unfreeze()
            self.frozen_at = 0
            self._since = 0
            self._closed = 0
