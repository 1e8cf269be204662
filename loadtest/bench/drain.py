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
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import redis
from redis.exceptions import ResponseError

from loadtest.queries import named
from voteflow.children import Child
from voteflow.keys import GROUP, Keys
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
CHUNK = 10_000  # votes generated, and XADDed in one pipeline, at a time
CEILING_BATCH = 1000  # rows per unnest call of the ceiling
POLL_EVERY = 0.1  # seconds between two looks at the backlog
# Votes per second queued, drained by one worker, and written by the ceiling,
# and the seconds of a round's fresh databases and checkpoints, for the plan
# (read off a run on 2 cores).
QUEUED_PER_S = 70_000.0
DRAINED_PER_S = 20_000.0
CEILING_PER_S = 60_000.0
ROUND_S = 3.0
# A drain that makes no progress for this long has failed (a worker stuck).
STALL_TIMEOUT = 120.0


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the backlog of one repeat is made of; the votes are generated from it
    (twice: for the streams and for the ceiling), never all held at once."""

    votes: int
    hot: tuple[str, tuple[str, ...]]  # (poll id, option ids)
    others: list[tuple[str, tuple[str, ...]]]
    seed: int
    id_base: int  # vote i's id is the UUID of the integer id_base + i
    start_us: int  # vote i was received at start_us + 10 * i

    @property
    def revotes(self) -> int:
        return self.votes // REVOTE_EVERY  # positions 9, 19, 29 ...

    @property
    def distinct_voters(self) -> int:
        # Every vote that is not a re-vote has a voter of its own.
        return self.votes - self.revotes

    def chunks(self, size: int = CHUNK) -> Iterator[list[Vote]]:
        rng = random.Random(self.seed)
        originals = 0
        chunk: list[Vote] = []
        for i in range(self.votes):
            if i % REVOTE_EVERY == REVOTE_EVERY - 1:
                j = rng.randrange(originals)  # an earlier voter, again
            else:
                j = originals
                originals += 1
            poll_id, options = self.hot if j % 2 == 0 else self.others[(j // 2) % len(self.others)]
            chunk.append(
                Vote(
                    vote_id=str(uuid.UUID(int=self.id_base + i)),
                    poll_id=poll_id,
                    voter=f"f:drain-{j}",
                    option_ids=(options[rng.randrange(len(options))],),
                    received_us=self.start_us + 10 * i,
                )
            )
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


@dataclass(slots=True)
class Columns:
    """One ceiling batch as unnest's arrays."""

    polls: list[str] = field(default_factory=list)
    vote_ids: list[str] = field(default_factory=list)
    voters: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)  # uuid[] literals
    received: list[int] = field(default_factory=list)

    def add(self, vote: Vote, literal: str) -> None:
        self.polls.append(vote.poll_id)
        self.vote_ids.append(vote.vote_id)
        self.voters.append(vote.voter)
        self.options.append(literal)
        self.received.append(vote.received_us)

    def args(self) -> tuple[list[str], list[str], list[str], list[str], list[int]]:
        return self.polls, self.vote_ids, self.voters, self.options, self.received


# The ceiling's statements, by name (drain_ceiling.sql says what each does).
CEILING = named(Path(__file__).with_name("drain_ceiling.sql"))


class Drain(Stage):
    number = 4
    name = "drain"
    title = "voteflow worker draining a backlog in the streams -> PostgreSQL"
    requests = False

    def start(self, bench: Bench) -> None:
        self.bench = bench
        self.store = bench.store()
        self.keys = Keys(KEY_PREFIX, SHARDS)
        self.redis = redis.Redis.from_url(self.store.redis_url, socket_timeout=60)
        bench.stack.callback(self.redis.close)
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
        drain_db = f"drain_{self.repeat}"
        ceiling_db = f"drain_ceiling_{self.repeat}"
        drain_url = self._fresh_database(drain_db)
        try:
            plan = self._plan(drain_url, options.drain_votes)
            ceiling_url = self._fresh_database(ceiling_db)
            try:
                self._copy_polls(drain_url, ceiling_url)
                self._clear_streams()
                filled = time.monotonic()
                self._fill(plan)
                progress(
                    f"drain: {plan.votes:,} votes queued in {time.monotonic() - filled:.1f}s; "
                    f"draining with {options.drain_workers} worker(s)"
                )
                sql(drain_url, "CHECKPOINT")
                sample = self._drain(plan, drain_url, options.drain_workers)
                self._clear_streams()
                sql(ceiling_url, "CHECKPOINT")
                ceiling = asyncio.run(_ceiling(ceiling_url, plan, connections))
            finally:
                self._drop(ceiling_db)
        finally:
            self._drop(drain_db)
        ceiling_rate = plan.votes / ceiling
        progress(
            f"drain: ceiling: {plan.votes:,} rows in {ceiling:.1f}s = {ceiling_rate:,.0f} "
            f"rows/s over {connections} connections; drain/ceiling "
            f"{sample.rate / ceiling_rate:.2f}"
        )
        extra = dict(sample.extra)
        extra["ceiling_rows_per_s"] = ceiling_rate
        extra["drain_over_ceiling"] = sample.rate / ceiling_rate
        return replace(sample, extra=extra)

    # The steps of a repeat.

    def _fresh_database(self, name: str) -> str:
        self._drop(name)
        sql(self.store.postgres.url, f'CREATE DATABASE "{name}"')
        url = database_url(self.store.postgres.url, name)
        asyncio.run(migrate(url))
        return url

    def _drop(self, name: str) -> None:
        sql(self.store.postgres.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _plan(self, url: str, votes: int) -> Backlog:
        created = sql(
            url,
            "SELECT create_poll('Drain poll ' || n || '?', $2, false, 1, NULL)::text "
            "FROM generate_series(0, $1) AS n ORDER BY n",
            OTHER_POLLS, list(OPTIONS), answer="fetch",
        )  # fmt: skip
        query = "SELECT poll_id::text, array_agg(id::text ORDER BY position) FROM options"
        options = dict(sql(url, query + " GROUP BY 1", answer="fetch"))
        polls = [(row[0], tuple(options[row[0]])) for row in created]
        rng = random.SystemRandom()
        return Backlog(
            votes=votes,
            hot=polls[0],
            others=polls[1:],
            seed=rng.getrandbits(64),
            id_base=rng.getrandbits(127),
            start_us=time.time_ns() // 1000,
        )

    def _copy_polls(self, source: str, target: str) -> None:
        """The polls of `source` (ids and all, tallies at zero) into `target`."""
        tables = ("polls", "options", "tallies", "poll_counters")

        async def copy() -> None:
            src = await asyncpg.connect(source)
            dst = await asyncpg.connect(target)
            try:
                async with dst.transaction():
                    for table in tables:
                        rows = await src.fetch(f"SELECT * FROM {table}")
                        await dst.copy_records_to_table(
                            table,
                            records=[tuple(row) for row in rows],
                            columns=list(rows[0].keys()),
                        )
            finally:
                await src.close()
                await dst.close()

        asyncio.run(copy())

    def _clear_streams(self) -> None:
        """Remove this stage's keys and let Redis rewrite its append-only file."""
        keys = list(self.redis.scan_iter(match=f"{KEY_PREFIX}:*", count=1000))
        for start in range(0, len(keys), 500):
            self.redis.delete(*keys[start : start + 500])
        self.store.compact()

    def _fill(self, plan: Backlog) -> None:
        for stream in self.keys.streams():
            try:
                self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        shards = self.keys.shards
        for chunk in plan.chunks():
            pipe = self.redis.pipeline(transaction=False)
            for vote in chunk:
                pipe.xadd(self.keys.stream(vote.shard(shards)), {FIELD: vote.encode()})
            pipe.execute()
        queued = sum(self._stream_lengths())
        if queued != plan.votes:
            raise RuntimeError(f"drain: {queued} entries in the streams, {plan.votes} expected")

    def _stream_lengths(self) -> list[int]:
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.keys.streams():
            pipe.xlen(stream)
        return [int(n) for n in pipe.execute()]

    def _drain(self, plan: Backlog, url: str, workers: int) -> Sample:
        env = self.bench.child_env(
            VOTEFLOW_DATABASE_URL=url,
            VOTEFLOW_REDIS_URL=self.store.redis_url,
            VOTEFLOW_ADMIN_TOKEN=secrets.token_urlsafe(24),
            VOTEFLOW_KEY_PREFIX=KEY_PREFIX,
            VOTEFLOW_STREAM_SHARDS=str(SHARDS),
            VOTEFLOW_BATCH_SIZE=str(BATCH_SIZE),
            VOTEFLOW_CONSUMERS=str(CONSUMERS),
            VOTEFLOW_WORKER_METRICS_PORT="0",
            VOTEFLOW_LOG_LEVEL="WARNING",
        )
        postgres_pid, (redis_pid,) = self.store.postgres_pid, self.store.redis_pids
        store_before = tree_cpu(postgres_pid)
        redis_before = cpu_seconds(redis_pid)
        started = time.monotonic()
        children: list[Child] = [
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
        stored, ballots = self._check(url)
        diff = ballots - plan.distinct_voters
        progress(
            f"drain: drained {plan.votes:,} votes in {seconds:.1f}s = "
            f"{plan.votes / seconds:,.0f} votes/s; "
            f"check: {stored:,} vote rows, sum(total_ballots) {ballots:,}, distinct voters "
            f"{plan.distinct_voters:,}: "
            + ("OK" if diff == 0 and stored == plan.votes else "WRONG")
        )
        return Sample(
            rate=plan.votes / seconds,
            requests=plan.votes,
            accepted=plan.votes,
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

    def _check(self, url: str) -> tuple[int, int]:
        stored, ballots = sql(
            url,
            "SELECT (SELECT count(*) FROM votes), "
            "(SELECT coalesce(sum(total_ballots), 0) FROM poll_counters)",
            answer="fetchrow",
        )
        return int(stored), int(ballots)


def _batches(plan: Backlog, connections: int) -> list[list[Columns]]:
    """The plan's rows in batches of CEILING_BATCH, split among the connections by
    stream shard (one voter's rows on one connection, as in the workers)."""
    literals: dict[tuple[str, ...], str] = {}
    per_connection: list[list[Columns]] = [[Columns()] for _ in range(connections)]
    for chunk in plan.chunks():
        for vote in chunk:
            batches = per_connection[vote.shard(SHARDS) % connections]
            if len(batches[-1].polls) == CEILING_BATCH:
                batches.append(Columns())
            literal = literals.get(vote.option_ids)
            if literal is None:
                literal = literals[vote.option_ids] = "{" + ",".join(vote.option_ids) + "}"
            batches[-1].add(vote, literal)
    return [[b for b in batches if b.polls] for batches in per_connection]


async def _write(conn: asyncpg.Connection, batches: list[Columns]) -> None:
    for batch in batches:
        args = batch.args()
        for attempt in range(5):
            try:
                async with conn.transaction():
                    await conn.execute(CEILING["votes"], *args)
                    await conn.execute(CEILING["ballots"], *args)
                    await conn.execute(CEILING["lock_tallies"], batch.polls, batch.options)
                    await conn.execute(CEILING["tallies"], batch.polls, batch.options)
                    await conn.execute(CEILING["lock_counters"], batch.polls)
                    await conn.execute(CEILING["counters"], batch.polls)
                break
            except asyncpg.exceptions.DeadlockDetectedError:
                if attempt == 4:
                    raise


async def _ceiling(url: str, plan: Backlog, connections: int) -> float:
    """Seconds the bare upserts of the plan's rows take over `connections`."""
    work = _batches(plan, connections)
    conns = [await asyncpg.connect(url, command_timeout=120) for _ in range(connections)]
    try:
        started = time.monotonic()
        await asyncio.gather(
            *(_write(conn, batches) for conn, batches in zip(conns, work, strict=True))
        )
        seconds = time.monotonic() - started
        written = await conns[0].fetchval("SELECT count(*) FROM votes")
        if written != plan.votes:
            raise RuntimeError(f"drain ceiling: {written} vote rows, {plan.votes} expected")
        return seconds
    finally:
        for conn in conns:
            await conn.close()
