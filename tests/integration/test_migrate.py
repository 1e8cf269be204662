"""voteflow.migrate against a real, empty PostgreSQL database: the numbered
files once each, then the function files that changed."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import asyncpg
import pytest

from tests.support import applied_versions, migration_names
from voteflow.migrate import function_files, migrate, migration_files, sql_dir

_DEFINES = re.compile(
    r"^\s*CREATE\s+(?:OR\s+REPLACE\s+)?(?:FUNCTION|PROCEDURE)\s+(\w+)",
    re.MULTILINE | re.IGNORECASE,
)

# The last commit at which the numbered files created the functions themselves:
# a database migrated before sql/functions/ has its functions from them.
_BEFORE_FUNCTION_FILES = "eabed04"
_REPOSITORY = Path(__file__).resolve().parents[2]


def test_sql_dir_holds_the_numbered_files_and_the_function_files() -> None:
    names = [path.name for _, path in migration_files()]
    assert names[:2] == ["0001_schema.sql", "0002_cast_vote_atomic.sql"]
    assert all(path.parent == sql_dir() for _, path in migration_files())
    assert "cast_votes.sql" in [path.name for path in function_files()]


def test_each_function_has_one_body_in_one_function_file() -> None:
    defined: dict[str, str] = {}
    for path in sorted(sql_dir().rglob("*.sql")):
        name = str(path.relative_to(sql_dir()))
        for function in _DEFINES.findall(path.read_text()):
            assert path.parent.name == "functions", f"{name} defines {function}"
            assert function not in defined, f"{function} is in {defined[function]} and {name}"
            defined[function] = name
    assert {"cast_votes", "cast_vote_atomic", "create_poll", "poll_list"} <= set(defined)


async def _functions(dsn: str) -> dict[str, str]:
    """Every function of the schema, by signature, with its definition, and
    every trigger, by table and name, with its."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS name, pg_get_functiondef(p.oid) AS body"
            " FROM pg_proc AS p WHERE p.pronamespace = 'public'::regnamespace"
            " UNION ALL"
            " SELECT 'trigger ' || t.tgname || ' ON ' || t.tgrelid::regclass::text,"
            " pg_get_triggerdef(t.oid) FROM pg_trigger AS t WHERE NOT t.tgisinternal"
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


async def test_a_broken_function_file_undoes_the_whole_run_on_a_migrated_database(
    empty_database_url: str, own_sql: Path
) -> None:
    await migrate(empty_database_url, directory=own_sql)
    before = await _functions(empty_database_url)
    (own_sql / "9001_more.sql").write_text("CREATE TABLE more (id int);\n")
    recount = own_sql / "functions" / "poll_recount.sql"
    recount.write_text(recount.read_text().replace("count(*) FROM votes", "count(*) FROM votes ("))
    with pytest.raises(asyncpg.PostgresSyntaxError):
        await migrate(empty_database_url, directory=own_sql)
    assert await _functions(empty_database_url) == before
    assert await applied_versions(empty_database_url) == [v for v, _ in migration_files()]
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('more')") is None
    finally:
        await conn.close()


def _sql_before_function_files(directory: Path) -> Path:
    """sql/ as it was when the numbered files created the functions, written
    into `directory`; skips the test where git cannot give it."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(_REPOSITORY), "archive", _BEFORE_FUNCTION_FILES, "sql"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"no git history to read sql/ at {_BEFORE_FUNCTION_FILES} from: {error}")
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory / "sql"


# Stopped after 0004, the functions of 0001 to 0004 (0008 rewrote some); after
# 0008, the poll_get and poll_list that 0009 drops; after 0009, the poll_list
# that 0010 drops; after 0011, every function and the trigger.
@pytest.mark.parametrize("stopped_after", ["0004", "0008", "0009", "0011"])
async def test_a_database_migrated_before_function_files_ends_with_the_same_functions(
    empty_database_url: str, database_url: str, tmp_path: Path, stopped_after: str
) -> None:
    # database_url: a new database migrated by today's files (a clone of the
    # suite's template).
    old = _sql_before_function_files(tmp_path)
    assert not (old / "functions").exists()
    for path in old.glob("[0-9]*.sql"):
        if path.name[:4] > stopped_after:
            path.unlink()
    await migrate(empty_database_url, vote_partitions=2, directory=old)
    assert (await applied_versions(empty_database_url))[-1:] == [stopped_after]
    conn = await asyncpg.connect(empty_database_url)
    try:
        # voteflow migrate at eabed04 had no such table.
        await conn.execute("DROP TABLE schema_functions")
    finally:
        await conn.close()
    await migrate(empty_database_url, vote_partitions=2)
    upgraded = await _functions(empty_database_url)
    assert upgraded == await _functions(database_url)
    assert "trigger poll_counters_history ON poll_counters" in upgraded


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
