"""``voteflow audit``: check a live deployment against itself, read-only.

What it checks:

- Every poll (or one, ``--poll``): its live tallies (``tallies`` and
  ``poll_counters.total_ballots``) equal a recount from the ``votes`` table;
  in a single-vote poll every counted vote is its voter's current ballot in
  ``voter_ballots`` (so at most one counts per voter) and every current ballot
  is counted. ``cast_vote_atomic`` changes all of these in one transaction, so
  they hold at every commit: the streams need not be drained. One query over
  all polls (``audit_polls`` in ``sql/functions/audit_polls.sql``).
- Every poll's published snapshot (what ``results`` serves): at PostgreSQL's
  version it must carry PostgreSQL's tallies, and it is never newer. An older
  one is *stale*: a warning, not a failure, since a worker may be between its
  commit and its publication (or Redis lost the key); the results of such a
  poll lag behind until the poll's next commit is published.
- Every stream shard: the backlog (entries not yet delivered to the group
  ``writers`` plus entries delivered but not acknowledged), the idle time of
  the oldest pending entry, and the length of the dead-letter stream.

Exit status:

  0  everything consistent, no dead letters
  1  a mismatch: tallies, ballots or a snapshot disagree with PostgreSQL
  2  the audit could not run (settings, arguments, a server unreachable,
     migrations not applied, no such poll)
  3  consistent, but dead letters exist: an operator should look at them

Redis is read before PostgreSQL: a worker publishes a tally only after its
commit, so a snapshot read first can never be ahead of the database read
after it, unless something is wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import asyncpg
import orjson
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError, ResponseError

from .keys import GROUP, Keys
from .redisconn import AnyRedis, open_redis
from .settings import Settings, SettingsError
from .tally import SNAPSHOT_TALLY, SNAPSHOT_VERSION, decode

OK = 0
MISMATCH = 1
CANNOT_AUDIT = 2
DEAD_LETTERS = 3

CONNECT_TIMEOUT = 10.0
# Every Redis command the audit sends is small; a server silent this long is away.
REDIS_TIMEOUT = 30.0
# Snapshots read per Redis round trip.
SNAPSHOT_BATCH = 1000


class AuditError(Exception):
    """The audit cannot run; the message says why."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing wrong with (or, as a warning, worth knowing about) a poll."""

    poll_id: str
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Shard:
    shard: int
    length: int
    # Entries never delivered to the group; None when Redis cannot tell
    # (entries deleted mid-stream), then the backlog counts the stream length.
    undelivered: int | None
    pending: int
    oldest_pending_idle_ms: int | None
    dead_letters: int
    group: bool
    # On a Redis Cluster, the master ("host:port") that holds the shard.
    node: str = ""

    @property
    def backlog(self) -> int:
        return (self.length if self.undelivered is None else self.undelivered) + self.pending

    def line(self) -> str:
        idle = "-" if self.oldest_pending_idle_ms is None else f"{self.oldest_pending_idle_ms} ms"
        undelivered = f"<= {self.length}" if self.undelivered is None else f"{self.undelivered}"
        return (
            f"shard {self.shard}: backlog {self.backlog} ({undelivered} undelivered, "
            f"{self.pending} pending), oldest pending idle {idle}, "
            f"dead letters {self.dead_letters}"
            + ("" if self.group else f" (no group {GROUP!r}: no worker has started)")
            + (f", on {self.node}" if self.node else "")
        )


@dataclass(frozen=True, slots=True)
class Report:
    polls_checked: int
    problems: list[Finding]
    warnings: list[Finding]
    shards: list[Shard]

    @property
    def status(self) -> int:
        if self.problems:
            return MISMATCH
        if any(shard.dead_letters for shard in self.shards):
            return DEAD_LETTERS
        return OK

    def summary(self) -> dict[str, int]:
        return {
            "polls_checked": self.polls_checked,
            "polls_mismatched": len({f.poll_id for f in self.problems}),
            "stale_snapshots": len(self.warnings),
            "backlog": sum(shard.backlog for shard in self.shards),
            "pending": sum(shard.pending for shard in self.shards),
            "dead_letters": sum(shard.dead_letters for shard in self.shards),
        }

    def text(self) -> str:
        lines: list[str] = []
        by_poll: dict[str, list[str]] = {}
        for finding in self.problems:
            by_poll.setdefault(finding.poll_id, []).append(finding.message)
        lines.extend(f"poll {poll_id}: MISMATCH: " + "; ".join(m) for poll_id, m in by_poll.items())
        lines.extend(f"poll {w.poll_id}: warning: {w.message}" for w in self.warnings)
        lines.extend(shard.line() for shard in self.shards)
        s = self.summary()
        verdict = {
            OK: "consistent",
            MISMATCH: "MISMATCH",
            DEAD_LETTERS: "consistent, but dead letters need attention",
        }[self.status]
        lines.append(
            f"audit: {verdict}: {s['polls_checked']} polls checked, "
            f"{s['polls_mismatched']} mismatched, {s['stale_snapshots']} stale snapshots; "
            f"{len(self.shards)} shards: backlog {s['backlog']}, pending {s['pending']}, "
            f"dead letters {s['dead_letters']} (exit {self.status})"
        )
        return "\n".join(lines) + "\n"

    def json(self) -> bytes:
        return orjson.dumps(
            {
                "status": self.status,
                "summary": self.summary(),
                "problems": [asdict(f) for f in self.problems],
                "warnings": [asdict(f) for f in self.warnings],
                "shards": [{**asdict(shard), "backlog": shard.backlog} for shard in self.shards],
            },
            option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE,
        )


def check_poll(
    row: Any, snapshot: Sequence[bytes | None] | None
) -> tuple[list[Finding], list[Finding]]:
    """The problems and warnings of one ``audit_polls`` row; ``snapshot`` is
    its published (version, tally) as read from Redis before the row, or None
    when it was not read (the poll was created since)."""
    poll_id = str(row["poll_id"])
    problems: list[Finding] = []
    warnings: list[Finding] = []
    live: dict[str, int] = {}
    differing = []
    for option, votes, recount in zip(
        row["option_ids"], row["votes"], row["recount_votes"], strict=True
    ):
        if votes is not None:
            live[str(option)] = votes
        if votes != recount:
            differing.append({"option_id": str(option), "live": votes, "recount": recount})
    if differing:
        problems.append(
            Finding(
                poll_id,
                "tallies",
                "tallies differ from a recount: "
                + ", ".join(
                    f"option {d['option_id']} live {'none' if d['live'] is None else d['live']}"
                    f" recount {d['recount']}"
                    for d in differing
                ),
                {"options": differing},
            )
        )
    if row["total_ballots"] is None:
        problems.append(Finding(poll_id, "counters", "no poll_counters row"))
    elif row["total_ballots"] != row["recount_ballots"]:
        problems.append(
            Finding(
                poll_id,
                "total_ballots",
                f"total_ballots live {row['total_ballots']} recount {row['recount_ballots']}",
                {"live": row["total_ballots"], "recount": row["recount_ballots"]},
            )
        )
    ballots = {name: row[name] for name in ("not_current", "current_not_counted", "options_differ")}
    if any(ballots.values()):
        problems.append(
            Finding(
                poll_id,
                "voter_ballots",
                "voter_ballots disagree with the counted votes: "
                f"{ballots['not_current']} counted votes are not their voter's current ballot, "
                f"{ballots['current_not_counted']} current ballots are not counted, "
                f"{ballots['options_differ']} current ballots name other options than their vote",
                ballots,
            )
        )
    if snapshot is not None and row["version"] is not None:
        problem, warning = _check_snapshot(poll_id, row, live, snapshot)
        problems.extend(problem)
        warnings.extend(warning)
    return problems, warnings


def _check_snapshot(
    poll_id: str, row: Any, live: dict[str, int], snapshot: Sequence[bytes | None]
) -> tuple[list[Finding], list[Finding]]:
    version: int = row["version"]
    raw_version, raw_tally = snapshot
    if raw_version is None:
        if version == 0:
            return [], []  # nothing committed, nothing published
        return [], [
            Finding(
                poll_id,
                "snapshot_missing",
                f"no snapshot published, PostgreSQL at version {version} "
                "(results are read from PostgreSQL until the next commit publishes one)",
                {"postgres_version": version},
            )
        ]
    try:
        published = int(raw_version)
        tally = decode(raw_tally or b"")
    except (ValueError, TypeError, KeyError) as exc:
        return [Finding(poll_id, "snapshot_unreadable", f"snapshot cannot be read: {exc}")], []
    data = {"snapshot_version": published, "postgres_version": version}
    if published > version:
        return [
            Finding(
                poll_id,
                "snapshot_ahead",
                f"snapshot version {published} is ahead of PostgreSQL's {version}",
                data,
            )
        ], []
    if published < version:
        return [], [
            Finding(
                poll_id,
                "snapshot_stale",
                f"stale snapshot: version {published}, PostgreSQL at {version} "
                "(a worker may be publishing)",
                data,
            )
        ]
    differences = [
        f"{name} {mine} in the snapshot, {theirs} in PostgreSQL"
        for name, mine, theirs in (
            ("poll", tally.poll_id, poll_id),
            ("version in the tally", tally.version, published),
            ("total_ballots", tally.total_ballots, row["total_ballots"]),
            *(
                (f"option {option}", tally.votes.get(option), live.get(option))
                for option in sorted(tally.votes.keys() | live.keys())
            ),
        )
        if mine != theirs
    ]
    if differences:
        return [
            Finding(
                poll_id,
                "snapshot_inconsistent",
                f"snapshot at version {published} differs from PostgreSQL: "
                + ", ".join(differences),
                data,
            )
        ], []
    return [], []


async def _snapshots(
    redis: AnyRedis, keys: Keys, poll_ids: Sequence[str]
) -> dict[str, list[bytes | None]]:
    """Each poll's published (version, tally), one round trip per SNAPSHOT_BATCH polls."""
    found: dict[str, list[bytes | None]] = {}
    for start in range(0, len(poll_ids), SNAPSHOT_BATCH):
        chunk = poll_ids[start : start + SNAPSHOT_BATCH]
        pipe = redis.pipeline(transaction=False)
        for poll_id in chunk:
            pipe.hmget(keys.tally(poll_id), [SNAPSHOT_VERSION, SNAPSHOT_TALLY])
        found.update(zip(chunk, await pipe.execute(), strict=True))
    return found


def _holder(redis: AnyRedis, key: str) -> str:
    if isinstance(redis, RedisCluster):
        node = redis.get_node_from_key(key)
        return "" if node is None else str(node.name)
    return ""


async def _shards(redis: AnyRedis, keys: Keys) -> list[Shard]:
    """Every shard's figures in two round trips."""
    pipe = redis.pipeline(transaction=False)
    for shard in range(keys.shards):
        pipe.xlen(keys.stream(shard))
        pipe.xlen(keys.dead_letters(shard))
        pipe.xinfo_groups(keys.stream(shard))
    replies = await pipe.execute(raise_on_error=False)
    figures: list[tuple[int, int, dict[Any, Any] | None]] = []
    for shard in range(keys.shards):
        length, dead, groups = replies[3 * shard : 3 * shard + 3]
        for reply in (length, dead):
            if isinstance(reply, Exception):
                raise reply
        if isinstance(groups, ResponseError) and "no such key" in str(groups).lower():
            groups = []  # no stream yet: no vote was ever queued on this shard
        elif isinstance(groups, Exception):
            raise groups
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        figures.append((length, dead, group))
    pipe = redis.pipeline(transaction=False)
    waiting = [shard for shard, (_, _, g) in enumerate(figures) if g and g["pending"]]
    for shard in waiting:
        pipe.xpending_range(keys.stream(shard), GROUP, min="-", max="+", count=1)
    oldest = dict(zip(waiting, await pipe.execute(), strict=True)) if waiting else {}
    shards = []
    for shard, (length, dead, group) in enumerate(figures):
        first = oldest.get(shard)
        shards.append(
            Shard(
                shard=shard,
                length=length,
                undelivered=length if group is None else group.get("lag"),
                pending=0 if group is None else group["pending"],
                oldest_pending_idle_ms=first[0]["time_since_delivered"] if first else None,
                dead_letters=dead,
                group=group is not None,
                node=_holder(redis, keys.stream(shard)),
            )
        )
    return shards


async def _read(conn: asyncpg.Connection, query: str, *args: Any) -> list[asyncpg.Record]:
    async with conn.transaction(readonly=True):
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows


async def audit(settings: Settings, poll_id: str | None = None) -> Report:
    """Audit the deployment ``settings`` names; raise AuditError if it cannot."""
    settings.require_urls()
    keys = Keys(settings.key_prefix, settings.stream_shards, settings.redis_cluster)
    # The only connections the audit uses, opened and closed here. Its queries
    # run in read-only transactions: the audit cannot change what it checks.
    # (Per transaction, not a session setting: PgBouncer's transaction
    # pooling refuses that start-up parameter.)
    conn = await asyncpg.connect(
        settings.database_url,
        timeout=CONNECT_TIMEOUT,
        server_settings={"application_name": "voteflow-audit"},
        statement_cache_size=settings.database_statement_cache_size,
    )
    try:
        async with open_redis(
            settings,
            max_connections=4,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
        ) as redis:
            if poll_id is None:
                polls = [str(r["id"]) for r in await _read(conn, "SELECT id FROM polls")]
            else:
                polls = [
                    str(r["id"])
                    for r in await _read(conn, "SELECT id FROM polls WHERE id = $1", poll_id)
                ]
                if not polls:
                    raise AuditError(f"no poll {poll_id}")
            # Redis first, then PostgreSQL (see the module docstring).
            snapshots = await _snapshots(redis, keys, polls)
            try:
                rows = await _read(conn, "SELECT * FROM audit_polls($1)", poll_id)
            except asyncpg.UndefinedFunctionError:
                raise AuditError(
                    "audit_polls() is missing from the database: run `voteflow migrate`"
                ) from None
            shards = await _shards(redis, keys)
    finally:
        await conn.close()
    problems: list[Finding] = []
    warnings: list[Finding] = []
    for row in rows:
        found, warned = check_poll(row, snapshots.get(str(row["poll_id"])))
        problems.extend(found)
        warnings.extend(warned)
    return Report(len(rows), problems, warnings, shards)


async def run(
    settings: Settings,
    *,
    poll_id: str | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The ``voteflow audit`` command: print the report, return the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        report = await audit(settings, poll_id)
    except (
        AuditError,
        SettingsError,
        OSError,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        RedisError,
    ) as exc:
        print(f"voteflow audit: {exc}", file=err)
        return CANNOT_AUDIT
    out.write(report.json().decode() if as_json else report.text())
    out.flush()
    return report.status
