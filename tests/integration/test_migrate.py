"""voteflow.migrate against a real, empty PostgreSQL database: the numbered
files once each, then the function files that changed."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import asyncpg
import pytest

from tests.support import applied_versions, migration_names
from voteflow.migrate import function_files, migrate, migration_files, sql_dir

_DEFINES = re.compile(r"^CREATE(?: OR REPLACE)? FUNCTION (\w+)", re.MULTILINE)


def test_sql_dir_holds_the_numbered_files_and_the_function_files() -> None:
    names = [path.name for _, path in migration_files()]
    assert names[:2] == ["0001_schema.sql", "0002_cast_vote_atomic.sql"]
    assert all(path.parent == sql_dir() for _, path in migration_files())
    assert "cast_votes.sql" in [path.name for path in function_files()]


def test_each_function_has_one_body_in_one_function_file() -> None:
    for _, path in migration_files():
        assert _DEFINES.findall(path.read_text()) == [], f"{path.name} defines a function"
    defined: dict[str, str] = {}
    for path in function_files():
        for name in _DEFINES.findall(path.read_text()):
            assert name not in defined, f"{name} is in {defined[name]} and {path.name}"
            defined[name] = path.name
    assert {"cast_votes", "cast_vote_atomic", "create_poll", "poll_list"} <= set(defined)


async def _functions(dsn: str) -> dict[str, str]:
    """Every function of the schema, by signature, with its definition."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS name, pg_get_functiondef(p.oid) AS body"
            " FROM pg_proc AS p WHERE p.pronamespace = 'public'::regnamespace"
        )
        return {row["name"]: row["body"] for row in rows}
    finally:
        await conn.close()


async def test_migrate_twice_is_a_no_op(empty_database_url: str) -> None:
    assert await migrate(empty_database_url, vote_partitions=2) == migration_names()
    functions = await _functions(empty_database_url)
    assert await migrate(empty_database_url, vote_partitions=2) == []
    assert await _functions(empty_database_url) == functions
    assert await applied_versions(empty_database_url) == [v for v, _ in migration_files()]


@pytest.fixture
def own_sql(tmp_path: Path) -> Path:
    """A copy of sql/ for a test to change."""
    return Path(shutil.copytree(sql_dir(), tmp_path / "sql"))


async def test_a_changed_function_file_is_applied_by_the_next_run_alone(
    empty_database_url: str, own_sql: Path
) -> None:
    await migrate(empty_database_url, directory=own_sql)
    recount = own_sql / "functions" / "poll_recount.sql"
    text = recount.read_text()
    recount.write_text(text.replace("count(*) FROM votes", "count(*) /* changed */ FROM votes"))
    assert await migrate(empty_database_url, directory=own_sql) == ["functions/poll_recount.sql"]
    body = (await _functions(empty_database_url))["poll_recount_ballots(uuid)"]
    assert "/* changed */" in body


async def test_a_numbered_file_that_drops_a_function_gets_it_back_from_its_file(
    empty_database_url: str, own_sql: Path
) -> None:
    # As a migration does to change a function's result columns.
    await migrate(empty_database_url, directory=own_sql)
    (own_sql / "9001_drop_poll_tally.sql").write_text("DROP FUNCTION poll_tally(uuid);\n")
    applied = await migrate(empty_database_url, directory=own_sql)
    assert applied[0] == "9001_drop_poll_tally.sql"
    assert "functions/poll_reads.sql" in applied
    assert "poll_tally(uuid)" in await _functions(empty_database_url)


async def test_a_broken_function_file_leaves_the_database_as_it_was(
    empty_database_url: str, own_sql: Path
) -> None:
    (own_sql / "functions" / "zz_broken.sql").write_text(
        "CREATE OR REPLACE FUNCTION broken() RETURNS int LANGUAGE sql AS $$ SELEC 1 $$;\n"
    )
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await migrate(empty_database_url, directory=own_sql)
    conn = await asyncpg.connect(empty_database_url)
    try:
        # Not one numbered file stayed: the run was one transaction.
        assert await conn.fetchval("SELECT to_regclass('polls')") is None
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_file_once(empty_database_url: str) -> None:
    results = await asyncio.gather(*(migrate(empty_database_url) for _ in range(3)))
    # One run applied everything; the others waited for it and found nothing to do.
    assert sorted(results, key=len) == [[], [], migration_names()]
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(
            migration_files()
        )
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname = 'create_poll'") == 1
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("partitions", [1, 5])
async def test_partition_count_follows_vote_partitions(
    empty_database_url: str, partitions: int
) -> None:
    await migrate(empty_database_url, vote_partitions=partitions)
    conn = await asyncpg.connect(empty_database_url)
    try:
        for table in ("votes", "voter_ballots"):
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = $1::regclass", table
            )
            assert count == partitions, table
    finally:
        await conn.close()


async def test_migrate_rejects_a_bad_partition_count(empty_database_url: str) -> None:
    with pytest.raises(ValueError, match="vote_partitions"):
        await migrate(empty_database_url, vote_partitions=0)


async def test_schema_file_refuses_to_run_without_the_partition_setting(
    empty_database_url: str,
) -> None:
    schema = next(path for _, path in migration_files() if path.name == "0001_schema.sql")
    conn = await asyncpg.connect(empty_database_url)
    try:
        with pytest.raises(asyncpg.InvalidParameterValueError, match="vote_partitions"):
            async with conn.transaction():
                await conn.execute(schema.read_text(encoding="utf-8"))
        # Nothing of it stays: the file ran in one transaction.
        assert await conn.fetchval("SELECT to_regclass('polls')") is None
    finally:
        await conn.close()
