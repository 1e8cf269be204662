"""The ``voteflow`` command: migrate, edge, worker, up (the whole stack), audit, deadletters,
poll."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import FrameType

import asyncpg

from . import polladmin
from .settings import Settings, SettingsError
from .stack import (
    Stack,
    admin_token,
    prepare,
    private_dir,
    read_stack,
    remember_demo_poll,
    remembered_demo_poll,
    remove_stack,
    start,
    write_stack,
)

log = logging.getLogger("voteflow")


def _logging(settings: Settings, several_processes: bool = False) -> None:
    # Several processes write to one terminal or journal: say which wrote what.
    pid = " [%(process)d]" if several_processes else ""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s{pid} %(name)s: %(message)s",
    )
    if settings.log_level.upper() != "DEBUG":
        # arq logs every run of the 5-second reclaim job at INFO.
        logging.getLogger("arq.worker").setLevel(logging.WARNING)


def cmd_migrate(settings: Settings) -> int:
    from .migrate import migrate

    if not settings.database_url:
        raise SettingsError("VOTEFLOW_DATABASE_URL is not set")
    applied = asyncio.run(migrate(settings.database_url, vote_partitions=settings.vote_partitions))
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


def cmd_edge(settings: Settings, processes: int) -> int:
    if processes > 1:
        from ingest.prefork import supervise

        return supervise(settings, processes)
    from ingest.app import run

    run(settings)
    return 0


def cmd_worker(settings: Settings) -> int:
    from workers.worker import MetricsPortTaken, run

    try:
        run(settings)
    except MetricsPortTaken as exc:
        # A setting to change, not a crash: one line, no traceback.
        print(f"voteflow worker: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_audit(settings: Settings, data_dir: Path, poll_id: str | None, as_json: bool) -> int:
    from .audit import run

    if not (settings.database_url and settings.redis_url):
        settings = settings.with_stack(read_stack(data_dir))
    return asyncio.run(run(settings, poll_id=poll_id, as_json=as_json))


def cmd_deadletters(settings: Settings, args: argparse.Namespace) -> int:
    from .deadletters import Choice, run

    choice = Choice(args.shard, args.poll, args.reason)
    return asyncio.run(run(settings, args.action, choice, as_json=args.json))


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _uuid(text: str | None) -> uuid.UUID | None:
    try:
        return None if text is None else uuid.UUID(text)
    except ValueError:
        return None


async def _demo_poll(database_url: str, remembered: str | None) -> tuple[str, str]:
    """(poll id, first option id) of the demo poll: the one an earlier run
    created while it is still open in this database, else a new one."""
    conn = await asyncpg.connect(database_url)
    try:
        poll_id = None
        if (earlier := _uuid(remembered)) is not None:
            poll_id = await conn.fetchval(
                "SELECT id FROM polls WHERE id = $1 AND closed_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > now())",
                earlier,
            )
        if poll_id is None:
            poll_id = await conn.fetchval(
                "SELECT create_poll($1, $2, false, 1, NULL)",
                "Which colour should the new logo be?",
                ["Blue", "Green", "Orange"],
            )
        option_id = await conn.fetchval(
            "SELECT id FROM options WHERE poll_id = $1 ORDER BY position LIMIT 1", poll_id
        )
    finally:
        await conn.close()
    return str(poll_id), str(option_id)


def edge_processes(private_servers: int) -> int:
    """How many edge processes `up` runs on this machine: a core each, once the
    worker and each private server it started have had one.

    One edge process uses at most one core (its event loop is one thread) and
    is bound by it (docs/benchmarks.md, Measured: 86% of its core at 7,601 votes/s), and
    the edges are what a spike meets: the streams hold what the worker has not
    written yet. The worker is one process, and so is each private server's
    hot path (Redis runs commands on one thread; PostgreSQL's backends are
    given one core between them): more edge processes than the cores left
    would only take CPU from them.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1 - private_servers)


def cmd_up(settings: Settings, data_dir: Path, processes: int | None) -> int:
    """Run the whole stack in the foreground until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, _raise_stop)
    # Started from a script (`voteflow up &`, nohup), the process begins with
    # SIGINT ignored, and Python then leaves it so: Ctrl-C would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    env = dict(os.environ)
    try:
        with contextlib.ExitStack() as stack:
            private_dir(data_dir)
            # Generated once and kept, so that the token printed last time still works.
            token = settings.admin_token or admin_token(data_dir)
            database_url, redis_url = prepare(stack, settings, data_dir, print)
            env.update(
                VOTEFLOW_DATABASE_URL=database_url,
                VOTEFLOW_REDIS_URL=redis_url,
                VOTEFLOW_ADMIN_TOKEN=token,
            )
            poll_id, option_id = asyncio.run(
                _demo_poll(database_url, remembered_demo_poll(data_dir))
            )
            remember_demo_poll(data_dir, poll_id)
            private = (not settings.database_url) + (not settings.redis_url)
            processes = processes or edge_processes(private)
            base = settings.local_url
            edge, workers = start(stack, env, base, processes=processes)
            procs = [*workers, edge]
            # For `voteflow poll` and `voteflow audit` run beside it; removed
            # first on the way out.
            write_stack(
                data_dir,
                Stack(
                    edge_url=base,
                    database_url=database_url,
                    redis_url=redis_url,
                    admin_token=token,
                    redis_cluster=settings.redis_cluster,
                    key_prefix=settings.key_prefix,
                    stream_shards=settings.stream_shards,
                    pid=os.getpid(),
                ),
            )
            stack.callback(remove_stack, data_dir, os.getpid())
            print(
                f"\nvoteflow is up at {base} ({processes} edge process"
                f"{'es' if processes > 1 else ''}, 1 worker)\n"
                f"  organize:      {base}/admin (create, close, share and export polls)\n"
                f"  open polls:    {base}/\n"
                f"  demo poll:     {base}/polls/{poll_id} (the voting page, live results)\n"
                f"  on a screen:   {base}/polls/{poll_id}/present (with its QR code)\n"
                f"  results:       {base}/api/polls/{poll_id}/results (.csv, .json)\n"
                f"  live (SSE):    curl -N {base}/api/polls/{poll_id}/live\n"
                f"  metrics:       {base}/metrics\n"
                f"  admin token:   {token}\n"
                f"  cast a vote:\n"
                f"    curl -s -X POST {base}/api/vote -H 'Content-Type: application/json' "
                f'-d \'{{"poll_id": "{poll_id}", "option_ids": ["{option_id}"], '
                f'"voter_fingerprint": "newcomer-1"}}\'\n'
                f"\nCtrl-C stops everything.",
                flush=True,
            )
            while all(proc.popen.poll() is None for proc in procs):
                time.sleep(0.5)
            for proc in procs:
                if proc.popen.returncode is not None:
                    print(
                        f"{proc.name} exited with status {proc.popen.returncode}", file=sys.stderr
                    )
            return 1
    except (KeyboardInterrupt, _Stop, asyncio.CancelledError):
        # A Ctrl-C during asyncio.run() (the migration, say) arrives as
        # CancelledError, not KeyboardInterrupt, when the interrupted task was
        # cancelled more than once on its way out (asyncpg closing, say).
        print("\nstopped", file=sys.stderr)
        return 0


def positive(text: str) -> int:
    """argparse's type of a whole number of at least 1 (the bench's too)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _poll_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a poll id (a UUID), got {text!r}") from None


def version() -> str:
    """The installed distribution's version (pyproject.toml), as pip reports it."""
    try:
        return metadata.version("voteflow")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voteflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"voteflow {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply the SQL migrations in sql/")
    edge = sub.add_parser("edge", help="run the HTTP edge")
    edge.add_argument(
        "--processes",
        type=positive,
        default=1,
        metavar="N",
        help="edge processes serving the one port, under a supervisor that restarts any that "
        "dies (default: 1, a single process and no supervisor). One process uses at most one "
        "core: N up to the cores it may have",
    )
    sub.add_parser("worker", help="run a stream worker (arq)")
    up = sub.add_parser("up", help="run the whole stack, with private servers if no URL is set")
    up.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".voteflow"),
        help="where private servers keep their data (default: .voteflow)",
    )
    up.add_argument(
        "--edge-processes",
        type=positive,
        metavar="N",
        help="edge processes (default: a core each, once the worker and each private server "
        "have had one; at least 1)",
    )
    # Where `voteflow up` keeps its data, and the file saying where its stack runs.
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".voteflow"),
        help="the data directory of the `voteflow up` whose stack to use when no URL is set "
        "(default: .voteflow)",
    )
    audit = sub.add_parser(
        "audit",
        parents=[data_dir],
        help="check a live deployment's tallies, snapshots and streams (read-only)",
        description="Check, read-only, that every poll's tallies equal a recount from the "
        "votes table (and, in single-vote polls, agree with voter_ballots), that no published "
        "snapshot is ahead of or differs from PostgreSQL (an older one is a 'stale' warning), "
        "and report each stream shard's backlog, oldest pending entry and dead letters.",
        epilog="exit status: 0 consistent, no dead letters; 1 a mismatch found; "
        "2 the audit could not run (settings, a server unreachable, migrations not applied, "
        "no such poll); 3 consistent, but dead letters exist",
    )
    audit.add_argument(
        "--poll", type=_poll_id, metavar="ID", help="audit this poll only (streams still all)"
    )
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    dead = sub.add_parser(
        "deadletters",
        help="list the dead letters, or requeue them to be counted",
        description="Dead letters are votes a worker could not count for a fault of their own "
        "(undecodable, rejected by the rules, refused by PostgreSQL when written alone, or "
        "held by VOTEFLOW_MAX_DELIVERIES workers that died). 'list' shows them; 'requeue' "
        "sends them back to their stream shard once the cause is fixed, where each is written "
        "like any vote and counted at most once.",
        epilog="exit status: 0 done; 2 could not run (settings, Redis unreachable, bad option)",
    )
    dead.add_argument("action", choices=["list", "requeue"])
    dead.add_argument("--shard", type=int, metavar="N", help="only this stream shard")
    dead.add_argument("--poll", type=_poll_id, metavar="ID", help="only votes for this poll")
    dead.add_argument("--reason", metavar="PREFIX", help="only reasons starting so (e.g. refused)")
    dead.add_argument("--json", action="store_true", help="print JSON")
    polladmin.add_parser(sub, data_dir)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        _logging(settings, several_processes=args.command == "edge" and args.processes > 1)
        if args.command == "migrate":
            return cmd_migrate(settings)
        if args.command == "edge":
            return cmd_edge(settings, args.processes)
        if args.command == "worker":
            return cmd_worker(settings)
        if args.command == "audit":
            return cmd_audit(settings, args.data_dir, args.poll, args.json)
        if args.command == "deadletters":
            return cmd_deadletters(settings, args)
        if args.command == "poll":
            return polladmin.run(settings, args)
        return cmd_up(settings, args.data_dir.resolve(), args.edge_processes)
    except SettingsError as exc:
        print(f"voteflow: {exc}", file=sys.stderr)
        return 2
