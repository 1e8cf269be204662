"""After a load test: was every vote answered 202 written to PostgreSQL exactly once?

    python -m loadtest.verdict --database-url postgresql://... --ledger loadtest/results/ledger \\
        [--redis-url redis://...] [--timeout 120]

Copies every ledger file (one per Locust process, one line per 202) into a
temporary table with one COPY, waits until the streams are drained and every
ledger vote is in PostgreSQL (or ``--timeout`` passes), then checks, set-based
(verdict.sql), that each vote_id is in ``votes`` exactly once, in the poll it
was sent to, and that the tallies of each poll voted on equal a recount
(rule 7). Prints one line:

    VERDICT: PASS 12,345 votes answered 202 (12,001 distinct vote_ids, 51 polls),
    all counted exactly once; every poll's tallies equal a recount

Exit status: 0 pass, 1 fail, 2 the check could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis
from redis.exceptions import RedisError, ResponseError

from loadtest.profile import DEFAULT_LEDGER
from loadtest.queries import named
from voteflow.keys import GROUP, Keys
from voteflow.settings import Settings, SettingsError

POLL_INTERVAL = 0.5
SAMPLES = 5


class VerdictError(Exception):
    """The check could not run (no ledger, a server unreachable...)."""


def ledger_records(paths: list[Path]) -> Iterator[tuple[uuid.UUID, uuid.UUID]]:
    """(vote_id, poll_id) of every line of the ledger files, streamed: a run's
    ledger may hold millions of lines."""
    for path in paths:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    record = uuid.UUID(entry["vote_id"]), uuid.UUID(entry["poll_id"])
                except (ValueError, KeyError, TypeError) as exc:
                    # A process killed mid-line leaves a partial last line: its
                    # 202 was never counted by anyone, so it is skipped, not failed.
                    if line.endswith("\n"):
                        raise VerdictError(f"{path}:{number}: not a ledger line: {exc}") from exc
                    continue
                yield record


# The statements, by name: verdict.sql says what each one does.
SQL = named(Path(__file__).with_name("verdict.sql"))


@dataclass
class Outcome:
    passed: bool
    line: str
    details: list[str] = field(default_factory=list)
    answered: int = 0  # 202s, a vote_id answered again included
    distinct: int = 0  # vote_ids answered 202
    missing: int = 0  # answered 202, in no poll
    duplicated: int = 0  # in PostgreSQL more than once
    wrong_poll: int = 0  # in another poll than the one it was sent to
    stored: int = 0  # votes of the ledger's polls in PostgreSQL
    # Votes of those polls whose 202 was never seen (the client stopped
    # waiting for it): not a failure.
    unexpected: int = 0


def backlog(client: redis.Redis | redis.RedisCluster, keys: Keys) -> int:
    """Entries of the consumer group not yet delivered, plus those delivered
    but not yet acknowledged: 0 once every appended vote is committed."""
    pipe = client.pipeline(transaction=False)
    for stream in keys.streams():
        pipe.xinfo_groups(stream)
        pipe.xlen(stream)
    replies = pipe.execute(raise_on_error=False)
    left = 0
    for groups, length in zip(replies[::2], replies[1::2], strict=True):
        if isinstance(groups, ResponseError):  # no such stream yet
            continue
        found = [g for g in groups if g["name"] in (GROUP, GROUP.encode())]
        if not found:  # no worker has created the group yet
            left += int(length)
            continue
        lag = found[0].get("lag")
        if lag is None:  # unknown to Redis: count from the stream's length
            lag = int(length) - (found[0].get("entries-read") or 0)
        left += int(lag) + int(found[0]["pending"])
    return left


async def check(
    database_url: str,
    ledger_dir: Path,
    *,
    redis_url: str = "",
    keys: Keys | None = None,
    drain_timeout: float = 120.0,
) -> Outcome:
    """The verdict on a load test's ledger directory (one file per Locust process)."""
    if not await asyncio.to_thread(ledger_dir.is_dir):
        return Outcome(False, f"VERDICT: FAIL no vote was answered 202 (no ledger {ledger_dir})")
    paths = await asyncio.to_thread(lambda: sorted(ledger_dir.glob("*.jsonl")))
    outcome = await verify(
        database_url,
        ledger_records(paths),
        redis_url=redis_url,
        keys=keys,
        drain_timeout=drain_timeout,
        what=f"ledger {ledger_dir}",
    )
    outcome.details.insert(0, f"ledger: {len(paths)} file(s)")
    return outcome


async def verify(
    database_url: str,
    records: Iterable[tuple[uuid.UUID, uuid.UUID]],
    *,
    redis_url: str = "",
    keys: Keys | None = None,
    drain_timeout: float = 0.0,
    what: str = "ledger",
) -> Outcome:
    """Is every (vote_id, poll_id) answered 202 in `records` in PostgreSQL
    exactly once, in its poll, and does each of those polls' tallies equal a
    recount? Waits up to `drain_timeout` s for the streams (with `redis_url`)
    and PostgreSQL to catch up first."""
    try:
        conn = await asyncpg.connect(database_url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise VerdictError(f"cannot connect to PostgreSQL: {exc}") from exc
    client = redis.Redis.from_url(redis_url) if redis_url else None
    try:
        await conn.execute(SQL["create"])
        # One COPY for the whole ledger, then set-based queries only.
        await conn.copy_records_to_table(
            "loadtest_answers", records=records, columns=["vote_id", "poll_id"]
        )
        await conn.execute(SQL["distinct"])
        summary = await conn.fetchrow(SQL["summary"])
        if not summary["distinct_votes"]:
            return Outcome(False, f"VERDICT: FAIL no vote was answered 202 ({what})")
        drain = await _wait(conn, client, keys, drain_timeout)
        row = await conn.fetchrow(SQL["check"], SAMPLES)
        one_poll = summary["first_poll"] if summary["polls"] == 1 else None
        unequal = [str(r["poll_id"]) for r in await conn.fetch(SQL["recount"], one_poll)]
    finally:
        await conn.close()
        if client is not None:
            client.close()
    return _judge(summary, row, unequal, drain)


def counted_once(database_url: str, poll_id: str, vote_ids: Iterable[str]) -> Outcome:
    """verify() from synchronous code, for vote_ids answered 202 for one poll
    once the streams are drained (the bench's wrk ledgers)."""
    poll = uuid.UUID(poll_id)
    records = ((uuid.UUID(vote_id), poll) for vote_id in vote_ids)
    return asyncio.run(verify(database_url, records))


async def _wait(
    conn: asyncpg.Connection, client: redis.Redis | None, keys: Keys | None, limit: float
) -> str:
    """Until the streams are drained and no ledger vote is missing; says how long."""
    started = time.monotonic()
    while True:
        missing = await conn.fetchval(SQL["missing"])
        pending = 0
        if client is not None and keys is not None:
            try:
                pending = await asyncio.to_thread(backlog, client, keys)
            except RedisError:
                pending = -1  # unknown: keep waiting until the timeout
        waited = time.monotonic() - started
        if missing == 0 and pending == 0:
            return f"drained after {waited:.1f}s"
        if waited >= limit:
            return f"not drained after {limit:.0f}s (streams or PostgreSQL still behind)"
        await asyncio.sleep(POLL_INTERVAL)


def _judge(summary: Any, row: Any, unequal: list[str], drain: str) -> Outcome:
    conflicts = summary["conflicts"] or []
    problems = [
        text
        for found, text in (
            (row["missing"], f"{row['missing']:,} not in PostgreSQL"),
            (row["duplicated"], f"{row['duplicated']:,} more than once"),
            (row["wrong_poll"], f"{row['wrong_poll']:,} in another poll"),
            (conflicts, f"{len(conflicts):,} answered 202 for two polls"),
            (unequal, f"tallies of {len(unequal)} poll(s) differ from a recount"),
        )
        if found
    ]
    details = [drain]
    if row["samples"]:
        details.append("e.g. vote_ids " + ", ".join(str(s) for s in row["samples"]))
    if conflicts:
        details.append("answered for two polls: " + ", ".join(map(str, conflicts[:SAMPLES])))
    if unequal:
        details.append("polls whose tallies differ from a recount: " + ", ".join(unequal[:SAMPLES]))
    if row["unexpected"]:
        details.append(f"{row['unexpected']:,} vote(s) of these polls whose 202 was not seen")
    line = (
        f"VERDICT: {'FAIL' if problems else 'PASS'} {summary['answered']:,} votes answered 202 "
        f"({summary['distinct_votes']:,} distinct vote_ids, {summary['polls']} polls)"
    )
    if problems:
        line += ": " + "; ".join(problems)
    else:
        line += ", all counted exactly once; every poll's tallies equal a recount"
    figures = ("missing", "duplicated", "wrong_poll", "stored", "unexpected")
    return Outcome(
        not problems,
        line,
        details,
        answered=summary["answered"],
        distinct=summary["distinct_votes"],
        **{name: row[name] for name in figures},
    )


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"verdict: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.verdict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--database-url",
        default=settings.database_url,
        help="PostgreSQL of the stack under test (default: $VOTEFLOW_DATABASE_URL)",
    )
    parser.add_argument(
        "--ledger",
        type=Path,
        default=DEFAULT_LEDGER,
        help=f"directory of the ledger files (default: {DEFAULT_LEDGER})",
    )
    parser.add_argument(
        "--redis-url",
        default=settings.redis_url,
        help="Redis of the stack, to wait until its streams are drained "
        "(default: $VOTEFLOW_REDIS_URL; none: wait for PostgreSQL only)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="most seconds to wait for the drain"
    )
    args = parser.parse_args(argv)
    if not args.database_url:
        print("verdict: --database-url or VOTEFLOW_DATABASE_URL is needed", file=sys.stderr)
        return 2
    keys = Keys(settings.key_prefix, settings.stream_shards)
    verdict = check(
        args.database_url,
        args.ledger,
        redis_url=args.redis_url,
        keys=keys,
        drain_timeout=args.timeout,
    )
    try:
        outcome = asyncio.run(verdict)
    except (VerdictError, OSError, asyncpg.PostgresError, RedisError) as exc:
        print(f"VERDICT: ERROR {exc}", flush=True)
        return 2
    for detail in outcome.details:
        print(f"  {detail}")
    print(outcome.line, flush=True)
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
