"""Publishing tallies: the snapshot that ``results`` reads, and the live channel."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from redis.exceptions import NoScriptError, RedisError

from voteflow.keys import Keys
from voteflow.redisconn import LuaScript, Nodes, RoutedPipeline
from voteflow.tally import SNAPSHOT_TALLY, SNAPSHOT_VERSION, Tally


class Publisher:
    def __init__(self, nodes: Nodes, keys: Keys, sharded: bool = False) -> None:
        self._nodes = nodes
        self._keys = keys
        # Sharded pub/sub on a cluster (Redis 7): the message stays on the
        # master of the poll's slot, where the edges watching it subscribe.
        self._publish = "SPUBLISH" if sharded else "PUBLISH"
        self._script = LuaScript.read(Path(__file__).parent / "publish.lua")

    async def load(self) -> None:
        await self._nodes.script_load(self._script.source)

    def queue(self, batch: RoutedPipeline, tally: Tally) -> None:
        """Add the publication of ``tally`` to a batch the caller executes."""
        snapshot = self._keys.tally(tally.poll_id)
        batch.for_key(snapshot).evalsha(
            self._script.sha,
            1,
            snapshot,
            tally.version,
            tally.encode(),
            self._keys.tally_channel(tally.poll_id),
            SNAPSHOT_VERSION,
            SNAPSHOT_TALLY,
            self._publish,
        )

    async def retry_unloaded(self, replies: Sequence[object], tallies: Sequence[Tally]) -> None:
        """Publish again the tallies whose script Redis had forgotten (it
        restarted); publishing is idempotent, versions decide."""
        missed = [t for t, r in zip(tallies, replies, strict=True) if isinstance(r, NoScriptError)]
        if not missed:
            return
        with contextlib.suppress(RedisError, OSError):
            await self.load()
            batch = self._nodes.pipeline()
            for tally in missed:
                self.queue(batch, tally)
            await batch.execute()
