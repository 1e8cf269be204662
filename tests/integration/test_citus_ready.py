"""The schema against Citus's rules, and cast_poll_votes against cast_vote_atomic.

Citus itself is not installable here (Debian bookworm has no package of it),
so everything is checked on plain PostgreSQL:

- ``sql/citus/*.sql`` run against a migrated database in which stand-ins of
  Citus's functions, with Citus's own signatures, record each call. So the
  files are valid SQL, every table and function they name exists (the
  ``regclass`` and ``regprocedure`` arguments resolve), and what they ask of
  Citus can be checked against the live catalog: the rules below are Citus's
  (docs.citusdata.com: "Creating and Modifying Distributed Objects (DDL)").
- The worker's Citus path calls ``cast_poll_votes`` once per poll of a batch;
  the stored votes, ballots and tallies must be exactly those of one
  ``cast_vote_atomic`` call for the same batch.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.integration.test_cast_vote_atomic import SECOND, T0, Poll, Vote, create_poll
from voteflow.migrate import sql_dir

CITUS_FILES = sorted((sql_dir() / "citus").glob("*.sql"))

# The tables that stay on the coordinator: voteflow.migrate's own records
# of applied files, read and written only where `voteflow migrate` runs.
COORDINATOR_ONLY = frozenset({"schema_migrations", "schema_functions"})

# Stand-ins for Citus's functions, with the signatures of Citus 13
# (src/backend/distributed/sql/udfs/*/latest.sql and citus--8.0-1.sql; the
# type of distribution_type is citus.distribution_type there, text here).
# Each records its call.
STUBS = """
CREATE SCHEMA citus_stub;
CREATE TABLE citus_stub.calls (
    ord           serial PRIMARY KEY,
    kind          text NOT NULL,
    object        oid NOT NULL,
    arg           text,
    colocate_with text,
    method        text
);
CREATE FUNCTION citus_stub.create_distributed_table(
    table_name regclass,
    distribution_column text,
    distribution_type text DEFAULT 'hash',
    colocate_with text DEFAULT 'default',
    shard_count int DEFAULT NULL
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO citus_stub.calls (kind, object, arg, colocate_with, method)
    VALUES ('distributed', table_name, distribution_column, colocate_with, distribution_type)
$$;
CREATE FUNCTION citus_stub.create_reference_table(table_name regclass)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO citus_stub.calls (kind, object) VALUES ('reference', table_name)
$$;
CREATE FUNCTION citus_stub.create_distributed_function(
    function_name regprocedure,
    distribution_arg_name text DEFAULT NULL,
    colocate_with text DEFAULT 'default',
    force_delegation bool DEFAULT NULL
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO citus_stub.calls (kind, object, arg, colocate_with)
    VALUES ('function', function_name, distribution_arg_name, colocate_with)
$$;
"""


# -- The Citus setup files against the schema --------------------------------


@dataclass
class Layout:
    """What sql/citus/ asks of Citus, by table and function name."""

    tables: list[str] = field(default_factory=list)  # in call order, repeats kept
    reference: set[str] = field(default_factory=set)
    distributed: dict[str, str] = field(default_factory=dict)  # table -> column
    colocate_with: dict[str, str] = field(default_factory=dict)
    functions: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    # regprocedure text -> (distribution argument, colocate_with)


async def apply_citus_files(db: asyncpg.Connection, files: Sequence[Path]) -> Layout:
    """Run the files against the stand-ins; what they asked for."""
    await db.execute(STUBS)
    await db.execute("SET search_path = citus_stub, public")
    for path in files:
        await db.execute(path.read_text(encoding="utf-8"))
    await db.execute("RESET search_path")
    layout = Layout()
    rows = await db.fetch(
        "SELECT kind, object, arg, colocate_with, method FROM citus_stub.calls ORDER BY ord"
    )
    for row in rows:
        if row["kind"] == "function":
            name = await db.fetchval("SELECT $1::oid::regprocedure::text", row["object"])
            layout.functions[name] = (row["arg"], row["colocate_with"])
            continue
        name = await db.fetchval("SELECT relname FROM pg_class WHERE oid = $1", row["object"])
        layout.tables.append(name)
        if row["kind"] == "reference":
            layout.reference.add(name)
        else:
            assert row["method"] == "hash", f"{name}: voteflow's tables are hash-distributed"
            layout.distributed[name] = row["arg"]
            layout.colocate_with[name] = row["colocate_with"]
    return layout


async def schema_tables(db: asyncpg.Connection) -> set[str]:
    """Tables of voteflow's schema; a partition goes with its parent."""
    rows = await db.fetch(
        "SELECT relname FROM pg_class"
        " WHERE relnamespace = current_schema()::text::regnamespace"
        "   AND relkind IN ('r', 'p') AND NOT relispartition"
    )
    return {row["relname"] for row in rows}


async def column_type(db: asyncpg.Connection, table: str, column: str) -> str | None:
    value: str | None = await db.fetchval(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attname = $2 AND attnum > 0 AND NOT attisdropped",
        table,
        column,
    )
    return value


async def problems(db: asyncpg.Connection, layout: Layout) -> list[str]:
    """Every way the schema and sql/citus/ break Citus's rules; empty if none."""
    found: list[str] = []
    tables = await schema_tables(db)

    # Every table is placed exactly once, but voteflow.migrate's own.
    for name in sorted(tables - COORDINATOR_ONLY):
        count = layout.tables.count(name)
        if count != 1:
            found.append(f"table {name} is named {count} times in sql/citus/")
    for name in sorted(COORDINATOR_ONLY & set(layout.tables)):
        found.append(f"table {name} stays on the coordinator, yet sql/citus/ places it")

    # Co-location: one group, anchored by the first table, the others joining
    # a table placed before them; one distribution column type throughout.
    group: list[str] = []
    for name in layout.tables:
        if name not in layout.distributed:
            continue
        target = layout.colocate_with[name]
        if not group:
            if target != "none":
                found.append(f"{name} starts voteflow's co-location group: colocate_with 'none'")
        elif target not in group:
            found.append(f"{name} is co-located with {target!r}, not with a table placed before")
        group.append(name)
    types = {
        name: await column_type(db, name, column) for name, column in layout.distributed.items()
    }
    for name, column in layout.distributed.items():
        if types[name] is None:
            found.append(f"{name} has no column {column}")
    if len(set(types.values())) > 1:
        found.append(f"distribution columns of different types cannot be co-located: {types}")

    # A distributed table's unique keys (its partitions' too) include its
    # distribution column; a reference table cannot be partitioned.
    for name, column in layout.distributed.items():
        rows = await db.fetch(
            "SELECT i.indexrelid::regclass::text AS index, c.relname AS rel,"
            "       a.attnum = ANY (i.indkey) AS has_column"
            " FROM pg_class AS c"
            " JOIN pg_index AS i ON i.indrelid = c.oid AND i.indisunique"
            " JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attname = $2"
            " WHERE c.oid = $1::regclass"
            "    OR c.oid IN (SELECT relid FROM pg_partition_tree($1::regclass))",
            name,
            column,
        )
        for row in rows:
            if not row["has_column"]:
                found.append(f"unique index {row['index']} of {row['rel']} lacks {column}")
    for name in layout.reference:
        if await db.fetchval("SELECT relkind = 'p' FROM pg_class WHERE relname = $1", name):
            found.append(f"{name} is partitioned: Citus can only hash-distribute it")

    # Foreign keys: between distributed tables, on the distribution column at
    # the same place on both sides (co-location is checked above); none from
    # a reference table to a distributed one; the target placed first.
    rows = await db.fetch(
        "SELECT conname, conrelid::regclass::text AS child, confrelid::regclass::text AS parent,"
        "       ARRAY(SELECT attname FROM unnest(conkey) WITH ORDINALITY AS k(n, i)"
        "             JOIN pg_attribute ON attrelid = conrelid AND attnum = k.n ORDER BY k.i)"
        "           AS child_columns,"
        "       ARRAY(SELECT attname FROM unnest(confkey) WITH ORDINALITY AS k(n, i)"
        "             JOIN pg_attribute ON attrelid = confrelid AND attnum = k.n ORDER BY k.i)"
        "           AS parent_columns"
        " FROM pg_constraint"
        " WHERE contype = 'f' AND connamespace = current_schema()::text::regnamespace"
        "   AND conparentid = 0"
    )
    for row in rows:
        child, parent, name = row["child"], row["parent"], row["conname"]
        if child in layout.distributed and parent in layout.distributed:
            pairs = set(zip(row["child_columns"], row["parent_columns"], strict=True))
            if (layout.distributed[child], layout.distributed[parent]) not in pairs:
                found.append(
                    f"foreign key {name} of {child} does not pair {layout.distributed[child]}"
                    f" with {parent}.{layout.distributed[parent]}"
                )
        elif child in layout.reference and parent in layout.distributed:
            found.append(f"foreign key {name}: reference table {child} -> distributed {parent}")
        if (
            child in layout.tables
            and parent in layout.tables
            and layout.tables.index(parent) > layout.tables.index(child)
        ):
            found.append(f"foreign key {name}: {parent} must be placed before {child}")

    # Functions: delegated by an argument of theirs, of the distribution
    # column's type, co-located with a distributed table; and whatever
    # function of the schema one calls exists on the workers too.
    for signature, (arg, colocate_with) in layout.functions.items():
        if arg is None:
            continue
        if colocate_with not in layout.distributed:
            found.append(f"{signature} is co-located with {colocate_with!r}: no distributed table")
            continue
        arg_type = await db.fetchval(
            "SELECT format_type(t, NULL)"
            " FROM pg_proc,"
            "      unnest(proargnames, coalesce(proallargtypes, proargtypes::oid[])) AS a(name, t)"
            " WHERE oid = $1::regprocedure AND a.name = $2",
            signature,
            arg,
        )
        if arg_type is None:
            found.append(f"{signature} has no argument {arg}")
        elif arg_type != types.get(colocate_with):
            found.append(f"{signature}: {arg} is {arg_type}, {colocate_with}'s column is not")
    schema_functions = {
        row["proname"]
        for row in await db.fetch(
            "SELECT proname FROM pg_proc WHERE pronamespace = current_schema()::text::regnamespace"
        )
    }
    distributed_names = {signature.split("(")[0] for signature in layout.functions}
    for signature in layout.functions:
        source = await db.fetchval(
            "SELECT prosrc FROM pg_proc WHERE oid = $1::regprocedure", signature
        )
        for called in sorted(set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", source))):
            if called in schema_functions and called not in distributed_names:
                found.append(f"{signature} calls {called}, which sql/citus/ does not distribute")
    return found


async def test_citus_files_exist() -> None:
    assert [path.name for path in CITUS_FILES] == ["0001_tables.sql", "0002_functions.sql"]


async def test_schema_follows_citus_rules(db: asyncpg.Connection) -> None:
    layout = await apply_citus_files(db, CITUS_FILES)
    assert await problems(db, layout) == []
    # What the worker's Citus path relies on.
    assert layout.functions["cast_poll_votes(uuid,vote_in[])"] == ("p_poll_id", "votes")


async def test_a_table_left_out_of_the_citus_files_is_found(db: asyncpg.Connection) -> None:
    await db.execute("CREATE TABLE poll_notes (poll_id uuid PRIMARY KEY, note text)")
    layout = await apply_citus_files(db, CITUS_FILES)
    assert await problems(db, layout) == ["table poll_notes is named 0 times in sql/citus/"]


async def test_a_unique_key_without_the_poll_is_found(db: asyncpg.Connection) -> None:
    await db.execute("CREATE UNIQUE INDEX options_id_idx ON options (id)")
    await db.execute("ALTER TABLE votes ADD CONSTRAINT votes_vote_id_key UNIQUE (vote_id, poll_id)")
    await db.execute("CREATE UNIQUE INDEX voter_ballots_p0_vote_idx ON voter_ballots_p0 (vote_id)")
    layout = await apply_citus_files(db, CITUS_FILES)
    assert await problems(db, layout) == [
        "unique index options_id_idx of options lacks poll_id",
        "unique index voter_ballots_p0_vote_idx of voter_ballots_p0 lacks poll_id",
    ]


async def test_a_foreign_key_without_the_poll_is_found(db: asyncpg.Connection) -> None:
    # The columns swapped: each tally's poll paired with an option id.
    await db.execute(
        "ALTER TABLE tallies ADD CONSTRAINT tallies_option_fk"
        " FOREIGN KEY (option_id, poll_id) REFERENCES options (poll_id, id)"
    )
    layout = await apply_citus_files(db, CITUS_FILES)
    assert await problems(db, layout) == [
        "foreign key tallies_option_fk of tallies does not pair poll_id with options.poll_id"
    ]


async def test_a_function_calling_an_undistributed_function_is_found(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    # cast_poll_votes calls cast_votes: leave cast_votes out.
    functions = CITUS_FILES[1].read_text(encoding="utf-8")
    without = re.sub(r"SELECT create_distributed_function\('cast_votes\(.*?;\n", "", functions)
    assert without != functions
    (tmp_path / "0002_functions.sql").write_text(without, encoding="utf-8")
    layout = await apply_citus_files(db, [CITUS_FILES[0], tmp_path / "0002_functions.sql"])
    assert await problems(db, layout) == [
        "cast_poll_votes(uuid,vote_in[]) calls cast_votes, which sql/citus/ does not distribute"
    ]


async def test_a_misplaced_table_or_function_is_found(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    tables = CITUS_FILES[0].read_text(encoding="utf-8")
    # tallies before options (its foreign key's target), co-located elsewhere.
    tables = tables.replace(
        "SELECT create_distributed_table('tallies', 'poll_id', colocate_with := 'polls');\n", ""
    ).replace(
        "SELECT create_distributed_table('options',",
        "SELECT create_distributed_table('tallies', 'poll_id', colocate_with := 'default');\n"
        "SELECT create_distributed_table('options',",
    )
    functions = (
        CITUS_FILES[1]
        .read_text(encoding="utf-8")
        .replace(
            "'cast_poll_votes(uuid, vote_in[])', 'p_poll_id'",
            "'cast_poll_votes(uuid, vote_in[])', 'p_votes'",
        )
    )
    (tmp_path / "0001_tables.sql").write_text(tables, encoding="utf-8")
    (tmp_path / "0002_functions.sql").write_text(functions, encoding="utf-8")
    layout = await apply_citus_files(
        db, [tmp_path / "0001_tables.sql", tmp_path / "0002_functions.sql"]
    )
    assert await problems(db, layout) == [
        "tallies is co-located with 'default', not with a table placed before",
        "foreign key tallies_poll_id_option_id_fkey: options must be placed before tallies",
        "cast_poll_votes(uuid,vote_in[]): p_votes is vote_in[], votes's column is not",
    ]


# -- cast_poll_votes, once per poll, against one cast_vote_atomic call --------


async def cast_per_poll(db: asyncpg.Connection, votes: Sequence[Vote]) -> list[tuple[Any, ...]]:
    """What the worker does on Citus: one cast_poll_votes call per poll of the
    batch (its votes in batch order), each in a transaction of its own; the
    rows put together as one cast_vote_atomic call returns them: one per vote
    in batch order, then the tally rows in poll order."""
    by_poll: dict[str, list[int]] = {}
    for i, vote in enumerate(votes):
        by_poll.setdefault(str(vote[1]), []).append(i)
    vote_rows: list[tuple[Any, ...] | None] = [None] * len(votes)
    tally_rows: list[tuple[Any, ...]] = []
    for poll_id, positions in by_poll.items():
        rows = await db.fetch(
            "SELECT * FROM cast_poll_votes($1::uuid, $2::vote_in[])",
            poll_id,
            [votes[i] for i in positions],
        )
        for i, row in zip(positions, rows[: len(positions)], strict=True):
            vote_rows[i] = tuple(row)
        tally_rows.extend(tuple(row) for row in rows[len(positions) :])
    assert all(row is not None for row in vote_rows)
    return [row for row in vote_rows if row is not None] + sorted(tally_rows, key=lambda r: r[1])


async def cast_batch(db: asyncpg.Connection, votes: Sequence[Vote]) -> list[tuple[Any, ...]]:
    rows = await db.fetch("SELECT * FROM cast_vote_atomic($1::vote_in[])", list(votes))
    return [tuple(row) for row in rows]


async def stored(db: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Everything cast_vote_atomic writes, but the commit times."""
    queries = {
        "votes": "SELECT poll_id, vote_id, voter, option_ids, received_at, counted FROM votes"
        " ORDER BY poll_id, vote_id",
        "voter_ballots": "SELECT * FROM voter_ballots ORDER BY poll_id, voter",
        "tallies": "SELECT * FROM tallies ORDER BY poll_id, option_id",
        "poll_counters": "SELECT poll_id, total_ballots, version FROM poll_counters"
        " ORDER BY poll_id",
    }
    return {name: [tuple(row) for row in await db.fetch(q)] for name, q in queries.items()}


def batches(polls: Sequence[tuple[Poll, int]], rng: random.Random) -> list[list[Vote]]:
    """Batches that span the polls, with what the rules must sort out:
    voters who vote again (in one batch and across batches, earlier or later),
    equal receipt times, vote_ids sent again (in one batch, in a later batch,
    and in another poll), invalid ballots and an unknown poll."""
    voters = [f"f:voter-{i}" for i in range(12)] + [f"u:voter-{i}" for i in range(6)]
    sent: list[Vote] = []
    out: list[list[Vote]] = []
    for _ in range(5):
        batch: list[Vote] = []
        for _ in range(120):
            roll = rng.random()
            if sent and roll < 0.12:
                batch.append(rng.choice(sent))  # the same vote_id again
                continue
            poll, max_choices = rng.choice(polls)
            vote_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            if sent and roll < 0.16:
                vote_id = str(rng.choice(sent)[0])  # a vote_id already used, maybe in another poll
            option_ids = rng.sample(poll.options, rng.randint(1, max_choices))
            if roll > 0.97:
                option_ids = [str(uuid.uuid4())]  # an option of no poll: invalid
            received = T0 + rng.randrange(0, 100) * SECOND  # equal times happen
            batch.append((vote_id, poll.id, rng.choice(voters), option_ids, received))
        unknown = str(uuid.uuid4())
        batch.append((str(uuid.uuid4()), unknown, "f:nobody", [str(uuid.uuid4())], T0))
        sent.extend(batch)
        out.append(batch)
    return out


async def test_cast_poll_votes_per_poll_equals_one_cast_vote_atomic_call(
    pg_server_url: str, database_url: str
) -> None:
    # Two databases with the same polls (same ids): one written by
    # cast_vote_atomic, batch by batch, the other by cast_poll_votes, poll by poll.
    db = await asyncpg.connect(database_url)
    try:
        expiry = datetime.fromtimestamp((T0 + 50 * SECOND) / SECOND, UTC)
        polls = [
            (await create_poll(db, 4), 1),
            (await create_poll(db, 3), 1),
            (await create_poll(db, 5, multiple=True, max_choices=2), 2),
            (await create_poll(db, 6, max_choices=2), 2),
            (await create_poll(db, 4, expires_at=expiry), 1),
        ]
    finally:
        await db.close()
    twin = f"{database_url.rsplit('/', 1)[1]}_twin"
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{twin}" TEMPLATE "{database_url.rsplit("/", 1)[1]}"')
        batch_conn = await asyncpg.connect(database_url)
        per_poll_conn = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/" + twin)
        try:
            outcomes: set[str] = set()
            for batch in batches(polls, random.Random(20261124)):
                expected = await cast_batch(batch_conn, batch)
                assert await cast_per_poll(per_poll_conn, batch) == expected
                assert await stored(per_poll_conn) == await stored(batch_conn)
                outcomes.update(row[2] for row in expected)
            # The batches exercised every outcome.
            assert outcomes == {
                "counted",
                "replaced",
                "duplicate",
                "closed",
                "invalid",
                "unknown_poll",
                "tally",
            }
            counters = await stored(batch_conn)
            assert all(version > 1 for _, _, version in counters["poll_counters"])
        finally:
            await batch_conn.close()
            await per_poll_conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{twin}" WITH (FORCE)')
        await admin.close()


async def test_cast_poll_votes_refuses_a_vote_of_another_poll(db: asyncpg.Connection) -> None:
    one, two = await create_poll(db), await create_poll(db)
    votes = [
        (str(uuid.uuid4()), one.id, "f:a", [one.options[0]], T0),
        (str(uuid.uuid4()), two.id, "f:b", [two.options[0]], T0),
    ]
    with pytest.raises(asyncpg.InvalidParameterValueError, match="every vote must name the poll"):
        await db.fetch("SELECT * FROM cast_poll_votes($1::uuid, $2::vote_in[])", one.id, votes)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="every vote must name the poll"):
        await db.fetch("SELECT * FROM cast_poll_votes(NULL, $1::vote_in[])", votes[:1])
    assert await db.fetchval("SELECT count(*) FROM votes") == 0
    # And the rules' own function refuses a vote outside the polls it is given.
    with pytest.raises(asyncpg.InvalidParameterValueError, match="outside p_polls"):
        await db.fetch("SELECT * FROM cast_votes($1::uuid[], $2::vote_in[])", [one.id], votes)
