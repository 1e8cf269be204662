"""Each test's own database: cloned from a migrated template, or one an earlier
test of this run left exactly as the template is, emptied.

Cloning costs about 0.3 s a test (PostgreSQL copies the whole catalog), more
than most tests take themselves. So when a test ends, its database is given
back: every other session on it is ended, and if its schema, its settings and
the rows the template holds are still the template's (a fingerprint of the
catalogs says so), its tables are emptied and the next test gets it. A test
that changed any of that (dropped a function, made the database read-only,
altered a table), or wrote more rows than an emptied table should carry as
dead ones, gets its database dropped instead, as before.
"""

from __future__ import annotations

import asyncpg

# What makes two databases of one cluster the same schema: relations, columns,
# functions, triggers, constraints, types and per-database settings. Not the
# relations' files or statistics, which emptying and autovacuum change.
_FINGERPRINT = """
SELECT md5(concat_ws('|',
  (SELECT string_agg(concat_ws(',', oid, relname, relkind, relnamespace, relnatts,
          relpersistence, relacl::text, reloptions::text, relhastriggers,
          relrowsecurity, relispartition), ';' ORDER BY oid) FROM pg_class),
  (SELECT string_agg(concat_ws(',', attrelid, attname, atttypid, attnotnull, atthasdef,
          attisdropped), ';' ORDER BY attrelid, attnum)
     FROM pg_attribute WHERE attrelid >= 16384),
  (SELECT string_agg(concat_ws(',', oid, proname, md5(prosrc), proconfig::text,
          proacl::text, provolatile), ';' ORDER BY oid) FROM pg_proc),
  (SELECT string_agg(concat_ws(',', oid, tgname, tgenabled), ';' ORDER BY oid) FROM pg_trigger),
  (SELECT string_agg(concat_ws(',', oid, conname, convalidated), ';' ORDER BY oid)
     FROM pg_constraint),
  (SELECT string_agg(concat_ws(',', oid, typname), ';' ORDER BY oid)
     FROM pg_type WHERE oid >= 16384),
  (SELECT string_agg(setconfig::text, ';' ORDER BY setrole) FROM pg_db_role_setting
     WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())),
  (SELECT concat_ws(',', datallowconn, datconnlimit, datacl::text) FROM pg_database
     WHERE datname = current_database())
))
"""
_TABLES = """
SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
 ORDER BY 1
"""
_OTHER_SESSIONS = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid()
"""
# An emptied table keeps its deleted rows until autovacuum: past this many in
# all, a fresh clone is cheaper for the tests that come after.
MAX_DELETED_ROWS = 20_000


def with_database(server_url: str, database: str) -> str:
    return server_url.rsplit("/", 1)[0] + "/" + database


class Databases:
    """The databases of one pytest process, on one server, from one template."""

    def __init__(self, server_url: str, template: str, name_prefix: str) -> None:
        self.server_url = server_url
        self.template = template
        self.name_prefix = name_prefix
        self._made = 0
        self._free: list[str] = []
        self._fingerprint = ""
        self._kept: dict[str, str] = {}  # table -> md5 of the rows the template holds
        self._emptied: list[str] = []

    async def prepare(self) -> None:
        """Read what a database cloned from the template looks like."""
        conn = await asyncpg.connect(with_database(self.server_url, self.template))
        try:
            self._fingerprint = await conn.fetchval(_FINGERPRINT)
            for table in [row[0] for row in await conn.fetch(_TABLES)]:
                rows = await self._rows(conn, table)
                if rows is None:
                    self._emptied.append(table)
                else:
                    self._kept[table] = rows
        finally:
            await conn.close()

    @staticmethod
    async def _rows(conn: asyncpg.Connection, table: str) -> str | None:
        query = f"SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t"
        rows: str | None = await conn.fetchval(query)
        return rows

    async def take(self) -> str:
        """A database name for one test."""
        if self._free:
            return self._free.pop()
        self._made += 1
        name = f"{self.name_prefix}_{self._made}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    async def give_back(self, name: str) -> None:
        if not await self._empty_if_unchanged(name):
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        self._free.append(name)

    async def _empty_if_unchanged(self, name: str) -> bool:
        try:
            conn = await asyncpg.connect(with_database(self.server_url, name))
        except (OSError, asyncpg.PostgresError):  # the test dropped it, say
            return False
        try:
            await conn.execute(_OTHER_SESSIONS)
            if await conn.fetchval(_FINGERPRINT) != self._fingerprint:
                return False
            for table, rows in self._kept.items():
                if await self._rows(conn, table) != rows:
                    return False
            deleted = 0
            async with conn.transaction():
                # Foreign keys and triggers do not fire (every table is emptied).
                await conn.execute("SET LOCAL session_replication_role = replica")
                for table in self._emptied:
                    status = await conn.execute(f"DELETE FROM {table}")
                    deleted += int(status.split()[-1])
            return deleted <= MAX_DELETED_ROWS
        finally:
            await conn.close()

    async def _admin(self, statement: str) -> None:
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()
