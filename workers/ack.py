"""Acknowledging committed entries, dead-lettering rejected ones, and trimming
them from the stream at once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from voteflow.keys import GROUP
from voteflow.message import FIELD
from voteflow.redisconn import LuaScript, Nodes, RoutedPipeline

# A rejected entry: its id, its raw message, and why it can never be counted.
Dead = tuple[bytes, bytes, str]


class Acknowledger:
    def __init__(self, nodes: Nodes) -> None:
        self._nodes = nodes
        self._script = LuaScript.read(Path(__file__).parent / "ack.lua")

    async def load(self) -> None:
        await self._nodes.script_load(self._script.source)

    def queue(
        self,
        batch: RoutedPipeline,
        stream: str,
        dead_letters: str,
        entry_ids: Sequence[bytes],
        dead: Sequence[Dead] = (),
        release: Sequence[str] = (),
    ) -> None:
        """Add to a batch the caller executes: move the `dead` entries to
        `dead_letters`, delete the idempotency keys in `release` (the dead
        votes'), acknowledge `entry_ids` and trim what is acknowledged (see
        ack.lua)."""
        args: list[Any] = [GROUP, FIELD, len(dead)]
        for entry_id, raw, reason in dead:
            args += [entry_id, raw, reason]
        batch.for_key(stream).evalsha(
            self._script.sha, 2 + len(release), stream, dead_letters, *release, *args, *entry_ids
        )
