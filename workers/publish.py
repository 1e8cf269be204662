"""Publishing tallies: the snapshot that ``results`` reads, and the live channel."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from voteflow.keys import Keys
from voteflow.tally import SNAPSHOT_TALLY, SNAPSHOT_VERSION, Tally


class Publisher:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._script = redis.register_script((Path(__file__).parent / "publish.lua").read_text())

    async def load(self) -> None:
        await self._redis.script_load(self._script.script)

    def queue(self, pipe: Pipeline, tally: Tally) -> None:
        """Add the publication of ``tally`` to a pipeline the caller executes."""
        # redis-py's stubs type script arguments as str; bytes and ints are sent as-is.
        pipe.evalsha(
            self._script.sha,
            1,
            self._keys.tally(tally.poll_id),
            tally.version,  # type: ignore[arg-type]
            tally.encode(),  # type: ignore[arg-type]
            self._keys.tally_channel(tally.poll_id),
            SNAPSHOT_VERSION,
            SNAPSHOT_TALLY,
        )

    async def retry_unloaded(self, replies: Sequence[object], tallies: Sequence[Tally]) -> None:
        """Publish again the tallies whose script Redis had forgotten (it
        restarted); publishing is idempotent, versions decide."""
        missed = [t for t, r in zip(tallies, replies, strict=True) if isinstance(r, NoScriptError)]
        if not missed:
            return
        with contextlib.suppress(RedisError, OSError):
            await self.load()
            pipe = self._redis.pipeline(transaction=False)
            for tally in missed:
                self.queue(pipe, tally)
            await pipe.execute(raise_on_error=False)
