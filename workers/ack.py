"""Acknowledging committed entries, and trimming them from the stream at once."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from voteflow.keys import GROUP


class Acknowledger:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script((Path(__file__).parent / "ack.lua").read_text())

    async def load(self) -> None:
        await self._redis.script_load(self._script.script)

    def queue(self, pipe: Pipeline, stream: str, entry_ids: list[bytes]) -> None:
        """Add to a pipeline the caller executes: acknowledge the entries and
        trim what is acknowledged (see ack.lua)."""
        pipe.evalsha(self._script.sha, 1, stream, GROUP, *entry_ids)  # type: ignore[arg-type]
