"""Helpers the tests share: a worker running in the test's loop, API shortcuts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import orjson
import psutil
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from ingest.app import create_app
from voteflow.keys import GROUP
from voteflow.migrate import function_files, migration_files
from voteflow.settings import Settings
from workers.consume import WRITER, Writer
from workers.reclaim import reclaim
from workers.worker import SETTINGS, shutdown, startup

REPO = Path(__file__).resolve().parents[1]
# Long enough for the start-up check (VOTEFLOW_ADMIN_TOKEN, at least 24 characters).
ADMIN_TOKEN = "test-admin-token-of-the-suite-only"
# Admin calls are JSON, a close without a body too (415 otherwise).
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def edge_client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """An HTTP edge on a loopback port, and a client for it."""
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


def ballot(poll: dict[str, Any], voter: str = "v", option: int = 0) -> dict[str, Any]:
    """A valid vote body for one option of ``poll``."""
    return {
        "poll_id": poll["id"],
        "option_ids": [poll["options"][option]["id"]],
        "voter_fingerprint": voter,
    }


def shell_env(**extra: str) -> dict[str, str]:
    """An operator's shell: no VOTEFLOW_* but ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEFLOW_")}
    return env | extra


async def voteflow(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, str, str]:
    """Run ``python -m voteflow ARGS`` from the checkout: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "voteflow", *args),
        env=shell_env() if env is None else env,
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


class InProcessWorker:
    """The consumers of one worker process, started as arq would start them."""

    def __init__(self, settings: Settings) -> None:
        self.ctx: dict[str, Any] = {SETTINGS: settings}

    async def __aenter__(self) -> InProcessWorker:
        await startup(self.ctx)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await shutdown(self.ctx)

    @property
    def writer(self) -> Writer:
        writer: Writer = self.ctx[WRITER]
        return writer

    async def reclaim(self) -> int:
        return await reclaim(self.ctx)


async def pause(worker: InProcessWorker) -> None:
    """Stop a worker's consumers; its reclaim job stays callable."""
    from workers.worker import CONSUMERS, STOP

    worker.ctx[STOP].set()
    await asyncio.gather(*worker.ctx[CONSUMERS])


async def backlog(redis: Any, settings: Settings) -> int:
    """Entries not yet delivered plus entries delivered but not acknowledged."""
    from voteflow.keys import Keys

    keys = Keys(settings.key_prefix, settings.stream_shards)
    total = 0
    for stream in keys.streams():
        if not await redis.exists(stream):
            continue
        for group in await redis.xinfo_groups(stream):
            if group["name"] in (GROUP, GROUP.encode()):
                total += (group.get("lag") or 0) + group["pending"]
    return total


async def drain(redis: Any, settings: Settings, timeout: float = 60.0) -> None:
    """Wait until every appended vote is committed and acknowledged."""
    async with asyncio.timeout(timeout):
        while await backlog(redis, settings):
            await asyncio.sleep(0.05)


async def create_poll(client: TestClient[Any, Any], **fields: Any) -> dict[str, Any]:
    body = {"question": "Which one?", "options": ["A", "B", "C"], **fields}
    response = await client.post("/api/polls", json=body, headers=ADMIN)
    assert response.status == 201, await response.text()
    poll: dict[str, Any] = await response.json()
    return poll


async def expire(database_url: str, poll_id: str) -> None:
    """Make a poll one that expired a moment ago (the API takes no past expires_at)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE polls SET expires_at = now() - interval '1 second' WHERE id = $1", poll_id
        )
    finally:
        await conn.close()


async def results(client: TestClient[Any, Any], poll_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/polls/{poll_id}/results")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def recount(database_url: str, poll_id: str) -> dict[str, int]:
    """The poll's tallies counted again from the votes table alone."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM poll_recount($1)", poll_id)
    finally:
        await conn.close()
    return {str(row["option_id"]): row["votes"] for row in rows}


def votes_by_option(result: dict[str, Any]) -> dict[str, int]:
    return {option["id"]: option["votes"] for option in result["options"]}


def processes_with_env(name: str, value: str) -> list[str]:
    """Live processes (not zombies) other than this one whose environment holds
    NAME=value, as "pid: command line": what a run that marked its children
    so left behind."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(name) != value or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append(f"{proc.pid}: {' '.join(proc.cmdline())}")
        except psutil.Error:
            continue
    return found


async def next_event(response: ClientResponse, timeout: float = 10.0) -> dict[str, Any]:
    """The next `tally` event of an SSE stream (heartbeat comments skipped)."""
    event: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        while True:
            raw = await response.content.readline()
            if not raw:
                raise AssertionError("the stream ended")
            line = raw.decode().rstrip("\n")
            if line == "":
                if "data" in event:
                    assert event["event"] == "tally"
                    data: dict[str, Any] = orjson.loads(event["data"])
                    assert int(event["id"]) == data["version"]
                    return data
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            event[name] = value


def migration_names() -> list[str]:
    """What voteflow.migrate reports applying to a new database, in order."""
    numbered = [path.name for _, path in migration_files()]
    return numbered + [f"functions/{path.name}" for path in function_files()]


async def applied_versions(dsn: str) -> list[str]:
    """The versions schema_migrations records, in order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [row["version"] for row in rows]
    finally:
        await conn.close()
