"""The suite's promise to each test: a migrated database of its own with no
polls or votes in it, whatever the test before it did to its own."""

from __future__ import annotations

import asyncpg

from tests.databases import Databases, with_database


async def _execute(pg_server_url: str, name: str, *statements: str) -> None:
    conn = await asyncpg.connect(with_database(pg_server_url, name))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _count(pg_server_url: str, name: str, table: str) -> int:
    conn = await asyncpg.connect(with_database(pg_server_url, name))
    try:
        count: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
        return count
    finally:
        await conn.close()


async def test_a_database_given_back_unchanged_comes_back_empty(
    pg_server_url: str, databases: Databases
) -> None:
    name = await databases.take()
    await _execute(
        pg_server_url, name, "INSERT INTO polls (question) VALUES ('Lunch?'), ('Dinner?')"
    )
    migrations = await _count(pg_server_url, name, "schema_migrations")
    await databases.give_back(name)
    again = await databases.take()
    try:
        assert again == name
        assert await _count(pg_server_url, again, "polls") == 0
        assert await _count(pg_server_url, again, "schema_migrations") == migrations
    finally:
        await databases.give_back(again)


async def test_a_database_whose_schema_or_settings_changed_is_never_handed_out_again(
    pg_server_url: str, databases: Databases
) -> None:
    changes = [
        "DROP FUNCTION cast_vote_atomic",
        "ALTER TABLE polls ADD COLUMN note text",
        "ALTER DATABASE {db} SET default_transaction_read_only = on",
        "DELETE FROM schema_migrations",
    ]
    for change in changes:
        name = await databases.take()
        await _execute(pg_server_url, name, change.format(db=f'"{name}"'))
        await databases.give_back(name)
        fresh = await databases.take()
        try:
            assert fresh != name, change
            conn = await asyncpg.connect(with_database(pg_server_url, fresh))
            try:
                assert await conn.fetchval("SHOW default_transaction_read_only") == "off"
                assert await conn.fetchval(
                    "SELECT count(*) FROM pg_proc WHERE proname = 'cast_vote_atomic'"
                )
            finally:
                await conn.close()
        finally:
            await databases.give_back(fresh)
