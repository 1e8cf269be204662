"""voteflow.migrate against a real, empty PostgreSQL database."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from voteflow.migrate import migrate, migration_files, sql_dir


def test_sql_dir_holds_the_numbered_files() -> None:
    names = [path.name for _, path in migration_files()]
    assert names[:2] == ["0001_schema.sql", "0002_cast_vote_atomic.sql"]
    assert all(path.parent == sql_dir() for _, path in migration_files())


async def test_migrate_twice_is_a_no_op(empty_database_url: str) -> None:
    names = [path.name for _, path in migration_files()]
    assert await migrate(empty_database_url, vote_partitions=2) == names
    assert await migrate(empty_database_url, vote_partitions=2) == []
    conn = await asyncpg.connect(empty_database_url)
    try:
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [row["version"] for row in versions] == [v for v, _ in migration_files()]
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_file_once(empty_database_url: str) -> None:
    names = [path.name for _, path in migration_files()]
    results = await asyncio.gather(*(migrate(empty_database_url) for _ in range(3)))
    # One run applied everything; the others waited for it and found nothing to do.
    assert sorted(results, key=len) == [[], [], names]
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(names)
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
