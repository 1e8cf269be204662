"""A private PgBouncer in front of the test's PostgreSQL, for tests of voteflow behind it.

Debian's pgbouncer binary, one child process like voteflow.servers' own
servers (and through the same machinery: its own process group, the kernel's
parent-death signal, the service account when we are root, since PgBouncer
refuses to run as root). Config, pidfile, log and unix socket live in its
data directory; it listens on a free port of 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import csv
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from urllib.parse import unquote, urlsplit

from voteflow.servers import (
    HOST,
    _chown_tree,
    _let_others_traverse,
    _postgres_bindir,
    _Server,
    _service_account,
)

DEBIAN_PGBOUNCER = "/usr/sbin/pgbouncer"
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
ADMIN_TIMEOUT = 10.0


def pgbouncer_executable() -> str | None:
    """pgbouncer on PATH, else Debian's (/usr/sbin is not on every PATH), else None."""
    found = shutil.which("pgbouncer")
    if found is None and os.access(DEBIAN_PGBOUNCER, os.X_OK):
        found = DEBIAN_PGBOUNCER
    return found


def _quoted(text: str) -> str:
    """A value for PgBouncer's auth_file: double quotes, doubled inside."""
    return '"' + text.replace('"', '""') + '"'


class PgBouncer(_Server):
    """PgBouncer pooling client connections onto at most `pool_size` server
    connections per database and user of the PostgreSQL at `upstream_url`.

    Clients log in as the upstream URL's user without a password (auth_type
    trust, the way the private PostgreSQL trusts its loopback clients); PgBouncer
    logs in to PostgreSQL with that user's password from the URL, if any. That
    user may also use the admin console (the `pgbouncer` database).
    """

    # Immediate shutdown: a safe one (SIGINT) waits for every client's
    # transaction, and a failed test may leave one open.
    _stop_signal = signal.SIGTERM
    _log_name = "pgbouncer.log"

    def __init__(
        self,
        data_dir: Path,
        upstream_url: str,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 4,
        max_client_conn: int = 1000,
        port: int | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        upstream = urlsplit(upstream_url)
        self.upstream_host = upstream.hostname or HOST
        self.upstream_port = upstream.port or 5432
        self.user = unquote(upstream.username or "postgres")
        self.password = unquote(upstream.password or "")
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn

    def url(self, database: str) -> str:
        """The URL of `database` through this PgBouncer."""
        return f"postgresql://{self.user}@{HOST}:{self.port}/{database}"

    def _prepare(self, deadline: float) -> tuple[list[str], pwd.struct_passwd | None]:
        executable = pgbouncer_executable()
        if executable is None:
            raise RuntimeError(f"no pgbouncer on PATH nor at {DEBIAN_PGBOUNCER}")
        run_as = _service_account() if os.geteuid() == 0 else None
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        users = self.data_dir / "users.txt"
        users.write_text(f"{_quoted(self.user)} {_quoted(self.password)}\n")
        config = self.data_dir / "pgbouncer.ini"
        config.write_text(self._config(users))
        if run_as is not None:
            _let_others_traverse(self.data_dir.parent)
            _chown_tree(self.data_dir, run_as)
        # No `logfile`: the log goes to stderr, which _spawn sends to log_path.
        return [executable, str(config)], run_as

    def _config(self, users: Path) -> str:
        socket_path = self.data_dir / f".s.PGSQL.{self.port}"
        # Too long a path for a unix socket: none at all (tests use TCP), never
        # the system's shared socket directory.
        socket_dir = self.data_dir if len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH else ""
        settings = {
            "listen_addr": HOST,
            "listen_port": str(self.port),
            "unix_socket_dir": str(socket_dir),
            "pidfile": str(self.data_dir / "pgbouncer.pid"),
            "auth_type": "trust",
            "auth_file": str(users),
            "admin_users": self.user,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size),
            # Server connections never exceed default_pool_size: no reserve, no minimum.
            "reserve_pool_size": "0",
            "min_pool_size": "0",
            "max_client_conn": str(self.max_client_conn),
        }
        lines = [
            "[databases]",
            # Any database name: the client's, on the upstream server.
            f"* = host={self.upstream_host} port={self.upstream_port}",
            "[pgbouncer]",
            *(f"{name} = {value}" for name, value in settings.items()),
        ]
        return "\n".join(lines) + "\n"

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        # PgBouncer listens only once its configuration is loaded.
        while True:
            if proc.poll() is not None:
                raise self._failed(f"pgbouncer exited with status {proc.returncode}")
            with suppress(OSError), socket.create_connection((HOST, self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise self._failed("pgbouncer did not listen in time")
            time.sleep(0.05)

    async def show(self, what: str) -> list[dict[str, str]]:
        """Rows of the admin console's `SHOW <what>` (POOLS, SERVERS, CLIENTS...).

        Through psql: the admin console speaks only the simple query protocol,
        and asyncpg's queries that return rows use the extended one.
        """
        psql = shutil.which("psql") or str(_postgres_bindir() / "psql")
        argv = [psql, "--no-psqlrc", "--csv", "-h", HOST, "-p", str(self.port)]
        argv += ["-U", self.user, "-d", "pgbouncer", "-c", f"SHOW {what}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), ADMIN_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"psql SHOW {what} failed: {err.decode(errors='replace')}")
        return list(csv.DictReader(out.decode().splitlines()))
