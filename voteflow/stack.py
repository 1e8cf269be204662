"""How ``voteflow up`` starts a stack (`prepare` its servers, `start` its
processes: the load test starts its own the same way), and what it keeps in its
data directory (``.voteflow/`` by default) for its next run and for the
commands run beside it.

- ``stack.json``: where the running stack is (the edge's base URL, the
  database and Redis URLs, the admin token, the pid of ``up``). Written once
  the edge answers, removed when ``up`` exits; ``voteflow poll`` and
  ``voteflow audit`` read it when no URL is given them. One whose ``up`` no
  longer runs (killed with SIGKILL, say) is ignored.
- ``admin-token``: the admin token ``up`` generated, used again on its next
  run unless ``VOTEFLOW_ADMIN_TOKEN`` is set, so that a bookmarked command
  keeps working.
- ``demo-poll``: the id of the demo poll ``up`` created, used again while it
  is open, instead of one more identical poll each run.

They hold secrets (the token, database URLs that may carry a password): each
file is created readable and writable by its owner only (0600), and the
directory is 0700. As root, the private PostgreSQL runs as a service user and
``voteflow.servers`` lets it traverse the directory (0701) to reach its data:
it can still neither list the directory nor read these files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import asyncpg
import orjson

from .children import Child, children, spawn
from .settings import Settings, SettingsError

STACK = "stack.json"
ADMIN_TOKEN = "admin-token"
DEMO_POLL = "demo-poll"
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


@dataclass(frozen=True, slots=True)
class Stack:
    """A running ``voteflow up``: where to reach it, and what its Redis keys are called."""

    edge_url: str
    database_url: str
    redis_url: str
    admin_token: str
    # The settings that name its keys in Redis, so that an audit run from
    # another shell reads the same keys as the stack's edge and worker.
    redis_cluster: bool
    key_prefix: str
    stream_shards: int
    pid: int


# What `up` keeps in its data directory: its own files and its servers' data.
_OURS = frozenset({STACK, ADMIN_TOKEN, DEMO_POLL, "postgres", "redis"})


def private_dir(path: Path) -> Path:
    """``path``, created if missing, closed to everyone but its owner.

    An existing directory is closed only when it holds nothing but what
    ``up`` keeps there (one made by an earlier voteflow, before these files):
    ``--data-dir ~`` or ``/tmp`` must not change who may use those. The files
    themselves are 0600 wherever they are.
    """
    try:
        path.mkdir(mode=PRIVATE_DIR, parents=True)
        return path
    except FileExistsError:
        pass
    mode = stat.S_IMODE(path.stat().st_mode)
    ours = all(entry.name in _OURS or entry.name.endswith(".partial") for entry in path.iterdir())
    if mode & 0o077 and ours:
        path.chmod(mode & ~0o077)
    return path


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by its owner only from the first byte."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # a leftover partial file may have had another mode
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(partial, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from None


def admin_token(data_dir: Path) -> str:
    """The token an earlier run generated, or a new one kept for the next run."""
    path = data_dir / ADMIN_TOKEN
    token = _read(path)
    if not token:
        token = secrets.token_urlsafe(24)
        write_private(path, token + "\n")
    return token


def remembered_demo_poll(data_dir: Path) -> str | None:
    return _read(data_dir / DEMO_POLL) or None


def remember_demo_poll(data_dir: Path, poll_id: str) -> None:
    write_private(data_dir / DEMO_POLL, poll_id + "\n")


def write_stack(data_dir: Path, stack: Stack) -> None:
    write_private(
        data_dir / STACK, orjson.dumps(asdict(stack), option=orjson.OPT_INDENT_2).decode()
    )


def remove_stack(data_dir: Path, pid: int) -> None:
    """Remove the stack file, if it is still the one ``up`` with this pid wrote."""
    with contextlib.suppress(SettingsError):
        found = _load(data_dir / STACK)
        if found is not None and found.pid == pid:
            (data_dir / STACK).unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def _load(path: Path) -> Stack | None:
    text = _read(path)
    if text is None:
        return None
    try:
        data = orjson.loads(text)
        return Stack(**{field.name: data[field.name] for field in fields(Stack)})
    except (orjson.JSONDecodeError, TypeError, KeyError):
        raise SettingsError(f"{path} is not a stack file `voteflow up` wrote") from None


def read_stack(data_dir: Path) -> Stack | None:
    """The stack ``voteflow up`` runs from ``data_dir``; None if none runs."""
    found = _load(data_dir / STACK)
    return found if found is not None and _running(found.pid) else None


def prepare(
    stack: contextlib.ExitStack, settings: Settings, data_dir: Path, say: Callable[[str], None]
) -> tuple[str, str]:
    """The database and Redis URLs of `settings`, or of private servers in
    `data_dir` started on `stack` where they name none (Redis with appendfsync
    always: a 202 means the vote is on disk); the database migrated."""
    from .migrate import migrate
    from .servers import PostgresServer, RedisServer

    database_url, redis_url = settings.database_url, settings.redis_url
    if not database_url:
        pg = stack.enter_context(PostgresServer(data_dir / "postgres"))
        database_url = asyncio.run(_database(pg.url, "voteflow"))
        say(f"private PostgreSQL: {database_url} (data in {data_dir / 'postgres'})")
    if not redis_url:
        redis = stack.enter_context(
            RedisServer(data_dir / "redis", appendonly=True, appendfsync="always")
        )
        redis_url = redis.url
        say(
            f"private Redis: {redis_url} (data in {data_dir / 'redis'}, "
            f"maxmemory {redis.maxmemory >> 20} MiB)"
        )
    asyncio.run(migrate(database_url, vote_partitions=settings.vote_partitions))
    return database_url, redis_url


async def _database(server_url: str, database: str) -> str:
    """Create ``database`` on a private server if missing; return its URL."""
    conn = await asyncpg.connect(server_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    return server_url.rsplit("/", 1)[0] + "/" + database


def start(
    stack: contextlib.ExitStack,
    env: dict[str, str],
    url: str,
    *,
    processes: int = 1,
    workers: int = 1,
    logs: Path | None = None,
    cwd: Path | None = None,
) -> tuple[Child, list[Child]]:
    """`workers` workers and an edge of `processes` processes with `env`,
    stopped when `stack` closes; returns once the edge answers `url`/health
    (their output in `logs`/<name>.log if given)."""
    started = stack.enter_context(children(timeout=30))

    def one(name: str, *argv: str) -> Child:
        log = None if logs is None else logs / f"{name}.log"
        argv_ = [sys.executable, "-m", "voteflow", *argv]
        started.append(spawn(name, argv_, env=env, cwd=cwd, log=log))
        return started[-1]

    names = ["worker"] if workers == 1 else [f"worker-{n}" for n in range(workers)]
    worker_list = [one(name, "worker") for name in names]
    edge = one("edge", "edge", "--processes", str(processes))
    edge.wait_http(f"{url}/health", timeout=60, beside=started)
    return edge, worker_list
