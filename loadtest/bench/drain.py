"""Stage 4, the drain: votes/s of ``python -m voteflow worker`` emptying a
backlog queued straight into the streams, against a PostgreSQL ceiling that
writes the same rows with bare batch upserts (``drain_ceiling.sql``). Each
repeat starts from fresh databases; docs/benchmarks.md (stage 4) gives the
backlog's make-up and the checks.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import asyncpg

from loadtest.queries import named
from voteflow.message import FIELD, Vote
from voteflow.migrate import migrate

from .procs import cpu_seconds, tree_cpu, tree_cpu_used
from .stack import SHARDS, VOTEFLOW, Bench, Options, database_url, progress, sql, wait_drained
from .stage import Plan, Sample, Stage

KEY_PREFIX = "drain"
BATCH_SIZE = 500  # VOTEFLOW_BATCH_SIZE's default
CONSUMERS = 4  # VOTEFLOW_CONSUMERS' default: each worker's pool of connections
OTHER_POLLS = 1000
OPTIONS = ("A", "B", "C", "D")
REVOTE_EVERY = 10  # every tenth vote is a re-vote
CHUNK = 10_000  # votes XADDed in one pipeline
CEILING_BATCH = 1000  # rows per unnest call of the ceiling
POLL_EVERY = 0.1  # seconds between two looks at the backlog
# Votes per second queued, drained by one worker, and written by the ceiling,
# and the seconds of a round's fresh databases and checkpoints, for the plan
# (read off a run on 2 cores).
QUEUED_PER_S = 60_000.0
DRAINED_PER_S = 16_000.0
CEILING_PER_S = 35_000.0
ROUND_S = 4.0
# A drain that makes no progress for this long has failed (a worker stuck).
STALL_TIMEOUT = 120.0

# The ceiling's statements, by name (drain_ceiling.sql says what each does).
CEILING = named(Path(__file__).with_name("drain_ceiling.sql"))
# One ceiling batch as unnest's arrays: polls, vote ids, voters, option-id
# array literals, received times in microseconds.
Columns = tuple[list[str], list[str], list[str], list[str], list[int]]


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the backlog of one repeat is made of: its votes are generated from
    it, once for the streams and once again for the ceiling."""

    votes: int
    hot: tuple[str, tuple[str, ...]]  # (poll id, option ids)
    others: list[tuple[str, tuple[str, ...]]]
    seed: int
    id_base: int  # vote i's id is the UUID of the integer id_base + i
    start_us: int  # vote i was received at start_us + 10 * i

    @property
    def distinct_voters(self) -> int:
        # Every vote that is not a re-vote (positions 9, 19, 29 ...) has a voter of its own.
        return self.votes - self.votes // REVOTE_EVERY

    def __iter__(self) -> Iterator[Vote]:
        """The votes in the order they are queued, the same on every call."""
        rng = random.Random(self.seed)
        originals = 0
        for i in range(self.votes):
            if i % REVOTE_EVERY == REVOTE_EVERY - 1:
                j = rng.randrange(originals)  # an earlier voter, again
            else:
                j = originals
                originals += 1
            poll_id, options = self.hot if j % 2 == 0 else self.others[(j // 2) % len(self.others)]
            yield Vote(
                vote_id=str(uuid.UUID(int=self.id_base + i)),
                poll_id=poll_id,
                voter=f"f:drain-{j}",
                option_ids=(options[rng.randrange(len(options))],),
                received_us=self.start_us + 10 * i,
            )


class Drain(Stage):
    number = 4
    name = "drain"
    title = "voteflow worker draining a backlog in the streams -> PostgreSQL"
    requests = False

    def start(self, bench: Bench) -> None:
        self.bench = bench
        self.store = bench.store()
        self.keys = self.store.keys(KEY_PREFIX)
        self.redis = self.store.client(bench.stack)
        self.repeat = 0

    def plan(self, options: Options, started: set[str]) -> Plan:
        votes = options.drain_votes
        return Plan(
            start=0.0,
            warm_up=0.0,
            round=ROUND_S + votes / QUEUED_PER_S + votes / DRAINED_PER_S + votes / CEILING_PER_S,
            rounds=self.rounds(options),
        )

    def rounds(self, options: Options) -> int:
        """How many of the run's rounds measure this stage: it is long."""
        return min(options.repeats, options.drain_repeats)

    def warm_up(self) -> None:
        """None: each repeat starts from fresh databases and new worker processes."""

    def measure(self) -> Sample:
        self.repeat += 1
        options = self.bench.options
        connections = options.drain_workers * CONSUMERS
        drain_db, ceiling_db = f"drain_{self.repeat}", f"drain_ceiling_{self.repeat}"
        try:
            drain_url = self._database(drain_db)
            backlog = self._backlog(drain_url, options.drain_votes)
            # The same polls (ids and all, tallies at zero) in a database of its own.
            ceiling_url = self._database(ceiling_db, template=drain_db)
            self.store.compact(empty=True)
            filled = time.monotonic()
            self._fill(backlog)
            progress(
                f"drain: {backlog.votes:,} votes queued in {time.monotonic() - filled:.1f}s; "
                f"draining with {options.drain_workers} worker(s)"
            )
            sql(drain_url, "CHECKPOINT")
            sample = self._drain(backlog, drain_url, options.drain_workers)
            self.store.compact(empty=True)
            sql(ceiling_url, "CHECKPOINT")
            ceiling = asyncio.run(_ceiling(ceiling_url, backlog, connections))
        finally:
            self._drop(ceiling_db)
            self._drop(drain_db)
        rate = backlog.votes / ceiling
        progress(
            f"drain: ceiling: {backlog.votes:,} rows in {ceiling:.1f}s = {rate:,.0f} rows/s "
            f"over {connections} connections; drain/ceiling {sample.rate / rate:.2f}"
        )
        extra = {"ceiling_rows_per_s": rate, "drain_over_ceiling": sample.rate / rate}
        return replace(sample, extra=sample.extra | extra)

    # The steps of a repeat.

    def _database(self, name: str, template: str | None = None) -> str:
        """A new database: migrated, or with `template` a copy of that one."""
        self._drop(name)
        server = self.store.postgres.url
        if template is None:
            sql(server, f'CREATE DATABASE "{name}"')
            asyncio.run(migrate(database_url(server, name)))
        else:
            sql(server, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return database_url(server, name)

    def _drop(self, name: str) -> None:
        sql(self.store.postgres.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _backlog(self, url: str, votes: int) -> Backlog:
        create = "SELECT create_poll('Drain poll ' || n || '?', $2, false, 1, NULL)"
        sql(url, create + " FROM generate_series(0, $1) AS n", OTHER_POLLS, list(OPTIONS))
        query = "SELECT poll_id::text, array_agg(id::text ORDER BY position) FROM options"
        rows = sql(url, query + " GROUP BY 1", answer="fetch")
        polls = [(poll_id, tuple(options)) for poll_id, options in rows]
        rng = random.SystemRandom()
        return Backlog(
            votes=votes,
            hot=polls[0],
            others=polls[1:],
            seed=rng.getrandbits(64),
            id_base=rng.getrandbits(127),
            start_us=time.time_ns() // 1000,
        )

    def _fill(self, backlog: Backlog) -> None:
        """Queue the votes as the edge would; the workers create their group."""
        votes = iter(backlog)
        while chunk := list(islice(votes, CHUNK)):
            pipe = self.redis.pipeline(transaction=False)
            for vote in chunk:
                pipe.xadd(self.keys.stream(vote.shard(SHARDS)), {FIELD: vote.encode()})
            pipe.execute()
        queued = self.store.stream_entries(self.redis, KEY_PREFIX)
        if queued != backlog.votes:
            raise RuntimeError(f"drain: {queued} entries in the streams, {backlog.votes} expected")

    def _drain(self, backlog: Backlog, url: str, workers: int) -> Sample:
        settings = self.store.env(KEY_PREFIX) | {
            "VOTEFLOW_DATABASE_URL": url,
            "VOTEFLOW_ADMIN_TOKEN": secrets.token_urlsafe(24),
            "VOTEFLOW_BATCH_SIZE": str(BATCH_SIZE),
            "VOTEFLOW_CONSUMERS": str(CONSUMERS),
            "VOTEFLOW_WORKER_METRICS_PORT": "0",
        }
        env = self.bench.child_env(**settings)
        postgres_pid, (redis_pid,) = self.store.postgres_pid, self.store.redis_pids
        store_before = tree_cpu(postgres_pid)
        redis_before = cpu_seconds(redis_pid)
        started = time.monotonic()
        children = [
            self.bench.spawn(f"drain-worker-{self.repeat}-{n}", [*VOTEFLOW, "worker"], env)
            for n in range(workers)
        ]
        wait_drained(self.redis, self.keys, children, STALL_TIMEOUT, POLL_EVERY)
        seconds = time.monotonic() - started
        worker_cpu = sum(cpu_seconds(child.pid) for child in children)
        store_used = tree_cpu_used(store_before, tree_cpu(postgres_pid))
        store_used += cpu_seconds(redis_pid) - redis_before
        for child in children:
            child.stop()
        stored, ballots = sql(
            url,
            "SELECT (SELECT count(*) FROM votes), "
            "(SELECT coalesce(sum(total_ballots), 0)::bigint FROM poll_counters)",
            answer="fetchrow",
        )
        diff = ballots - backlog.distinct_voters
        progress(
            f"drain: drained {backlog.votes:,} votes in {seconds:.1f}s = "
            f"{backlog.votes / seconds:,.0f} votes/s; "
            f"check: {stored:,} vote rows, sum(total_ballots) {ballots:,}, distinct voters "
            f"{backlog.distinct_voters:,}: "
            + ("OK" if diff == 0 and stored == backlog.votes else "WRONG")
        )
        return Sample(
            rate=backlog.votes / seconds,
            requests=backlog.votes,
            accepted=backlog.votes,
            seconds=seconds,
            server_cpu_seconds=worker_cpu,
            server_cpu_percent=100 * worker_cpu / seconds,
            store_cpu_seconds=store_used,
            stored=stored,
            extra={
                "drain_seconds": seconds,
                "total_ballots_minus_distinct_voters": float(diff),
            },
        )


def _batches(backlog: Backlog, connections: int) -> list[list[Columns]]:
    """The backlog's rows in batches of CEILING_BATCH, split among the connections
    by stream shard (one voter's rows on one connection, as in the workers)."""
    votes: list[list[Vote]] = [[] for _ in range(connections)]
    for vote in backlog:
        votes[vote.shard(SHARDS) % connections].append(vote)
    return [
        [_columns(own[i : i + CEILING_BATCH]) for i in range(0, len(own), CEILING_BATCH)]
        for own in votes
    ]


def _columns(votes: list[Vote]) -> Columns:
    return (
        [vote.poll_id for vote in votes],
        [vote.vote_id for vote in votes],
        [vote.voter for vote in votes],
        ["{" + ",".join(vote.option_ids) + "}" for vote in votes],
        [vote.received_us for vote in votes],
    )


async def _write(conn: asyncpg.Connection, batches: list[Columns]) -> None:
    """One connection's batches, each in a transaction of its own. No retry on a
    deadlock: none can happen (drain_ceiling.sql says why)."""
    for batch in batches:
        polls, options = batch[0], batch[3]
        async with conn.transaction():
            await conn.execute(CEILING["votes"], *batch)
            await conn.execute(CEILING["ballots"], *batch)
            await conn.execute(CEILING["lock_tallies"], polls, options)
            await conn.execute(CEILING["tallies"], polls, options)
            await conn.execute(CEILING["lock_counters"], polls)
            await conn.execute(CEILING["counters"], polls)


async def _ceiling(url: str, backlog: Backlog, connections: int) -> float:
    """Seconds the bare upserts of the backlog's rows take over `connections`."""
    work = _batches(backlog, connections)
    conns = [await asyncpg.connect(url, command_timeout=120) for _ in range(connections)]
    try:
        started = time.monotonic()
        await asyncio.gather(*map(_write, conns, work))
        seconds = time.monotonic() - started
        written = await conns[0].fetchval("SELECT count(*) FROM votes")
    finally:
        for conn in conns:
            await conn.close()
    if written != backlog.votes:
        raise RuntimeError(f"drain ceiling: {written} vote rows, {backlog.votes} expected")
    return seconds
