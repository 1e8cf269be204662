"""After a load test: was every vote answered 202 written to PostgreSQL exactly once?

    python -m loadtest.verdict --database-url postgresql://... --ledger loadtest/results/ledger \\
        [--redis-url redis://...] [--timeout 120]

Reads every ledger file (``*.jsonl``, one per Locust process, one line per
202) in ``--ledger``, copies the distinct vote_ids into a temporary table
with one COPY, then waits until the streams are drained (with ``--redis-url``:
no entry undelivered or unacknowledged in any shard) and every ledger vote is
in the ``votes`` table, or ``--timeout`` passes. Then, set-based, in one
statement: each vote_id must be in ``votes`` exactly once, in the poll it was
sent to. And the tallies of each poll the run voted on must equal a recount
(``audit_polls``, rule 7). Prints one line:

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

from loadtest.queries import named
from voteflow.keys import GROUP, Keys
from voteflow.settings import Settings, SettingsError

POLL_INTERVAL = 0.5
SAMPLES = 5


class VerdictError(Exception):
    """The check could not run (no ledger, a server unreachable...)."""


@dataclass
class LedgerStats:
    files: int = 0


def ledger_records(directory: Path, stats: LedgerStats) -> Iterator[tuple[uuid.UUID, uuid.UUID]]:
    """(vote_id, poll_id) of every line of every ledger file, streamed: a run's
    ledger may hold millions of lines, and none is held in memory."""
    for path in sorted(directory.glob("*.jsonl")):
        stats.files += 1
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
        found = [g for g in groups if _text(g["name"]) == GROUP]
        if not found:  # no worker has created the group yet
            left += int(length)
            continue
        lag = found[0].get("lag")
        if lag is None:  # unknown to Redis: count from the stream's length
            lag = int(length) - (found[0].get("entries-read") or 0)
        left += int(lag) + int(found[0]["pending"])
    return left


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
    stats = LedgerStats()
    outcome = await verify(
        database_url,
        ledger_records(ledger_dir, stats),
        redis_url=redis_url,
        keys=keys,
        drain_timeout=drain_timeout,
        what=f"ledger {ledger_dir}",
    )
    outcome.details.insert(0, f"ledger: {stats.files} file(s)")
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
        waited, drained = await _wait(conn, client, keys, drain_timeout)
        row = await conn.fetchrow(SQL["check"], SAMPLES)
        one_poll = summary["first_poll"] if summary["polls"] == 1 else None
        unequal = [str(r["poll_id"]) for r in await conn.fetch(SQL["recount"], one_poll)]
    finally:
        await conn.close()
        if client is not None:
            client.close()
    return _judge(summary, row, unequal, waited, drained, drain_timeout)


def counted_once(database_url: str, poll_id: str, vote_ids: Iterable[str]) -> Outcome:
    """verify() from synchronous code, for vote_ids answered 202 for one poll
    once the streams are drained (the bench's wrk ledgers)."""
    poll = uuid.UUID(poll_id)
    records = ((uuid.UUID(vote_id), poll) for vote_id in vote_ids)
    return asyncio.run(verify(database_url, records))


async def _wait(
    conn: asyncpg.Connection, client: redis.Redis | None, keys: Keys | None, limit: float
) -> tuple[float, bool]:
    """Until the streams are drained and no ledger vote is missing; (seconds, drained)."""
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
            return waited, True
        if waited >= limit:
            return waited, False
        await asyncio.sleep(POLL_INTERVAL)


def _judge(
    summary: Any,
    row: Any,
    unequal: list[str],
    waited: float,
    drained: bool,
    timeout: float,
) -> Outcome:
    head = (
        f"{summary['answered']:,} votes answered 202 "
        f"({summary['distinct_votes']:,} distinct vote_ids, {summary['polls']} polls)"
    )
    conflicts = summary["conflicts"] or []
    problems = []
    if row["missing"]:
        problems.append(f"{row['missing']:,} not in PostgreSQL")
    if row["duplicated"]:
        problems.append(f"{row['duplicated']:,} more than once")
    if row["wrong_poll"]:
        problems.append(f"{row['wrong_poll']:,} in another poll")
    if conflicts:
        problems.append(f"{len(conflicts):,} answered 202 for two polls")
    if unequal:
        problems.append(f"tallies of {len(unequal)} poll(s) differ from a recount")
    details = []
    if drained:
        details.append(f"drained after {waited:.1f}s")
    else:
        details.append(f"not drained after {timeout:.0f}s (streams or PostgreSQL still behind)")
    if row["samples"]:
        details.append("e.g. vote_ids " + ", ".join(str(s) for s in row["samples"]))
    if conflicts:
        details.append("answered for two polls: " + ", ".join(map(str, conflicts[:SAMPLES])))
    if unequal:
        details.append("polls whose tallies differ from a recount: " + ", ".join(unequal[:SAMPLES]))
    if row["unexpected"]:
        details.append(f"{row['unexpected']:,} vote(s) of these polls whose 202 was not seen")
    figures = {
        "answered": summary["answered"],
        "distinct": summary["distinct_votes"],
        "missing": row["missing"],
        "duplicated": row["duplicated"],
        "wrong_poll": row["wrong_poll"],
        "unexpected": row["unexpected"],
        "stored": row["stored"],
    }
    if problems:
        line = f"VERDICT: FAIL {head}: " + "; ".join(problems)
        return Outcome(False, line, details, **figures)
    line = f"VERDICT: PASS {head}, all counted exactly once; every poll's tallies equal a recount"
    return Outcome(True, line, details, **figures)


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
        default=Path("loadtest/results/ledger"),
        help="directory of the ledger files (default: loadtest/results/ledger)",
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
    try:
        outcome = asyncio.run(
            check(
                args.database_url,
                args.ledger,
                redis_url=args.redis_url,
                keys=keys,
                drain_timeout=args.timeout,
            )
        )
    except (VerdictError, OSError, asyncpg.PostgresError, RedisError) as exc:
        print(f"VERDICT: ERROR {exc}", flush=True)
        return 2
    for detail in outcome.details:
        print(f"  {detail}")
    print(outcome.line, flush=True)
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
