"""Schema migrations: the numbered ``sql/NNNN_*.sql`` files, applied in order,
then the functions of ``sql/functions/*.sql``.

Numbered files hold tables, types, indexes and data changes; each is applied
once, and never edited once it has landed. Functions are not in them: each
function has one file in ``sql/functions/`` holding its body in force, written
with CREATE OR REPLACE (Flyway calls such files repeatable migrations). A run
applies a function file when its text differs from the one it last applied
(``schema_functions`` keeps a SHA-256 per file), and every function file after
it applied any numbered file, whose DROP FUNCTION (to change a function's
result columns, which CREATE OR REPLACE cannot) the function files then
undo. So a numbered file must not call a function: on a new database the
functions come after every numbered file. Function files apply in name
order; a LANGUAGE sql function is checked against what exists when it is
created, so it must sort after the files of the functions it calls.

Only when changed, rather than on every run: replacing the trigger of
tally_history locks poll_counters against the writers' batches, and on Citus
a distributed function's CREATE OR REPLACE goes to every node. So a run with
nothing to do writes nothing (``voteflow migrate`` at every deploy is free);
the digests cost one read of a small table.

The numbered files 0001 to 0011 once created the functions themselves; when
``sql/functions/`` came, their bodies moved there, the one time landed files
were edited (a file left with comments alone is still recorded, so versions
keep their meaning). Applying ``sql/functions/`` reproduces what those files
created, on a new database and on one migrated before the move:
tests/integration/test_migrate.py compares the two.

A run applies the files not applied yet in one transaction, recording each in
``schema_migrations`` (and ``schema_functions``) in that same transaction: a
run applies all of them or, should one fail, none (the database keeps the
schema it had). The transaction holds an advisory lock from its first
statement: a second process migrating the same database at the same time
waits for the first, then finds nothing left to do.

Nothing outlives the transaction (a transaction-level lock, SET LOCAL, no
prepared statements), so migrations run through PgBouncer in transaction
pooling mode as well as straight to PostgreSQL. A session-level lock would
not: PgBouncer gives each transaction whichever server connection is free, so
the lock would stay with one pooled server connection after the run and block
the next run that is given another.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

# Files named like 0001_schema.sql; the version recorded is the number.
_FILE_NAME = re.compile(r"(?P<version>[0-9]{4})_[A-Za-z0-9_]+\.sql")

# One advisory lock key for every voteflow migration run on a database; held
# until the run's transaction ends.
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('voteflow.migrate', 0))"

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text        PRIMARY KEY,
    applied_at timestamptz DEFAULT now()
)
"""


_CREATE_FUNCTIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_functions (
    file       text        PRIMARY KEY,
    sha256     text        NOT NULL,
    applied_at timestamptz DEFAULT now()
)
"""
_RECORD_FUNCTIONS = """
INSERT INTO schema_functions (file, sha256) VALUES ($1, $2)
ON CONFLICT (file) DO UPDATE SET sha256 = excluded.sha256, applied_at = now()
"""


def sql_dir() -> Path:
    """The directory of the migration files.

    An installed wheel carries them as ``voteflow/sql`` (pyproject force-includes
    them); an editable install finds the repository's ``sql/`` beside the package.
    """
    packaged = importlib.resources.files("voteflow") / "sql"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def migration_files(directory: Path | None = None) -> list[tuple[str, Path]]:
    """The migration files as (version, path), in the order they are applied."""
    directory = sql_dir() if directory is None else directory
    files: dict[str, Path] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise RuntimeError(f"{path}: a migration file is named NNNN_name.sql")
        version = match["version"]
        if version in files:
            raise RuntimeError(f"{path} and {files[version]} have the same number")
        files[version] = path
    return sorted(files.items())


def _has_statements(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("--") for line in text.splitlines())


def function_files(directory: Path | None = None) -> list[Path]:
    """The function files, in the order they are applied."""
    directory = sql_dir() if directory is None else directory
    return sorted((directory / "functions").glob("*.sql"))


async def migrate(
    dsn: str, *, vote_partitions: int = 16, directory: Path | None = None
) -> list[str]:
    """Apply the migration files not applied yet, then the function files that
    changed; return their names (``functions/<file>`` for a function file).

    ``vote_partitions`` is the number of hash partitions of the vote tables,
    used only when the file that creates them is applied. ``directory``: the
    files' directory, if not voteflow's own ``sql/``.
    """
    if not 1 <= vote_partitions <= 9999:
        raise ValueError(f"vote_partitions must be from 1 to 9999, got {vote_partitions}")
    files = migration_files(directory)
    applied: list[str] = []
    # No statement cache: each statement runs once, and behind PgBouncer a
    # named prepared statement would stay on a pooled server connection.
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        async with conn.transaction():
            # First, so that a concurrent run waits here until this one commits
            # or rolls back (which releases the lock), then sees what it did.
            await conn.execute(_LOCK)
            await conn.execute(_CREATE_TABLE)
            rows = await conn.fetch("SELECT version FROM schema_migrations")
            done = {row["version"] for row in rows}
            # SET LOCAL: the setting ends with this transaction.
            await conn.execute(
                "SELECT set_config('voteflow.vote_partitions', $1, true)", str(vote_partitions)
            )
            for version, path in files:
                if version in done:
                    continue
                text = path.read_text(encoding="utf-8")
                # No arguments: the simple query protocol, which runs a file
                # of several statements. A file of comments alone (one whose
                # functions moved to sql/functions/) has nothing to run.
                if _has_statements(text):
                    await conn.execute(text)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(path.name)
            await conn.execute(_CREATE_FUNCTIONS_TABLE)
            rows = await conn.fetch("SELECT file, sha256 FROM schema_functions")
            # After a numbered file, every function file: it may have dropped one.
            recorded = {} if applied else {row["file"]: row["sha256"] for row in rows}
            for path in function_files(directory):
                text = path.read_text(encoding="utf-8")
                digest = hashlib.sha256(text.encode()).hexdigest()
                if recorded.get(path.name) == digest:
                    continue
                await conn.execute(text)
                await conn.execute(_RECORD_FUNCTIONS, path.name, digest)
                applied.append(f"functions/{path.name}")
    finally:
        await conn.close()
    for name in applied:
        log.info("applied migration %s", name)
    return applied
