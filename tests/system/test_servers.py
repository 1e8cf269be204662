"""The private servers start on a free port, keep data across restarts, recover
from a kill, and leave no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from tests.support import REPO
from voteflow.servers import (
    MAXMEMORY_SHARE,
    PostgresServer,
    RedisServer,
    _live_group_members,
    free_port,
    memory_limit,
)


def sql(url: str, query: str, *args: Any) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def is_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def assert_no_process_left(pid: int) -> None:
    assert is_gone(pid)
    assert _live_group_members(pid) == []


def test_free_port_is_unused_and_not_a_shared_servers_port() -> None:
    port = free_port()
    assert port not in (5432, 6379)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_never_hands_out_a_port_twice_before_it_is_bound() -> None:
    # A Redis Cluster's nodes get their ports and bus ports all before the
    # first starts: 500 draws from the 10,000 ports below the ephemeral range
    # would almost surely repeat one if each draw only checked that nothing
    # listens on it yet.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_postgres_keeps_data_across_stop_and_start_on_the_same_port(tmp_path: Path) -> None:
    pg = PostgresServer(tmp_path / "pg", durable=False)
    try:
        pg.start()
        port, pid = pg.port, pg.pid
        assert pid is not None
        assert pg.url == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        sql(pg.url, "CREATE TABLE t AS SELECT 42 AS v")

        pg.stop()
        assert pg.pid is None
        assert_no_process_left(pid)
        pg.stop()  # idempotent

        pg.start()
        assert pg.port == port
        assert sql(pg.url, "SELECT v FROM t") == 42
        assert sql(pg.url, "SHOW max_connections") == "200"
        assert sql(pg.url, "SHOW fsync") == "off"
    finally:
        pg.stop()


def test_postgres_recovers_after_kill_without_losing_commits(tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "pg") as pg:
        sql(pg.url, "CREATE TABLE t AS SELECT 7 AS v")
        pid = pg.pid
        assert pid is not None

        pg.kill()
        assert_no_process_left(pid)
        assert (pg.data_dir / "postmaster.pid").exists()  # stale, as after a crash

        pg.start()
        assert sql(pg.url, "SELECT v FROM t") == 7
        assert sql(pg.url, "SHOW fsync") == "on"


def test_redis_keeps_data_across_stop_and_start_on_the_same_port(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    try:
        server.start()
        port, pid = server.port, server.pid
        assert pid is not None
        assert server.url == f"redis://127.0.0.1:{port}/0"
        with redis.Redis.from_url(server.url) as client:
            client.xadd("votes", {"v": "1"})
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            assert client.config_get("save") == {"save": ""}

        server.stop()
        assert server.pid is None
        assert_no_process_left(pid)
        server.stop()  # idempotent

        server.start()
        assert server.port == port
        with redis.Redis.from_url(server.url) as client:
            assert client.xlen("votes") == 1
    finally:
        server.stop()


def test_redis_recovers_after_kill_without_losing_writes(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        pid = server.pid
        assert pid is not None

        server.kill()
        assert_no_process_left(pid)

        server.start()
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v"


def test_private_redis_is_bounded_by_a_share_of_memory_and_never_evicts(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        client = redis.Redis.from_url(server.url)
        try:
            config = client.config_get("maxmemory*")
        finally:
            client.close()
    assert int(config["maxmemory"]) == int(memory_limit() * MAXMEMORY_SHARE) > 0
    assert config["maxmemory-policy"] == "noeviction"


def test_start_refuses_a_port_another_server_listens_on(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(tmp_path / "redis", port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="already in use"):
            server.start()
        assert server.pid is None


CHILD = """
import sys, time
from pathlib import Path
from voteflow.servers import PostgresServer, RedisServer
base = Path(sys.argv[1])
pg = PostgresServer(base / "pg", durable=False)
pg.start()
valkey = RedisServer(base / "redis")
valkey.start()
print(pg.pid, valkey.pid, flush=True)
time.sleep(60)
"""


def test_servers_do_not_outlive_a_parent_that_dies_abruptly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    pids: list[int] = []
    try:
        assert child.stdout is not None
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 2
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while not all(map(is_gone, pids)) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in pids:
            assert_no_process_left(pid)
    finally:
        child.kill()
        child.wait()
        for pid in pids:  # do not leave servers behind if the test failed
            if not is_gone(pid):
                os.killpg(pid, signal.SIGKILL)
