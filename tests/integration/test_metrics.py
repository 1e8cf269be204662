"""What Prometheus scrapes from a running edge and worker: their pools' use,
and each worker's /metrics on a port of its own, on the address configured
(the monitoring files in infra/: tests/unit/test_monitoring_files.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
from typing import Any

import aiohttp
import asyncpg
import pytest

from ingest.metrics import EdgeMetrics
from tests.support import InProcessWorker
from voteflow.settings import WORKER_METRICS_PORTS, Settings
from workers.worker import METRICS_RUNNER, SETTINGS, MetricsPortTaken, shutdown, startup


async def test_pool_gauges_follow_an_asyncpg_pool(pg_server_url: str) -> None:
    metrics = EdgeMetrics()
    pool = await asyncpg.create_pool(pg_server_url, min_size=1, max_size=2)
    try:
        async with pool.acquire(), pool.acquire():
            metrics.observe_pool(pool)
            assert metrics.registry.get_sample_value("voteflow_db_pool_size") == 2
            assert metrics.registry.get_sample_value("voteflow_db_pool_in_use") == 2
        metrics.observe_pool(pool)
        assert metrics.registry.get_sample_value("voteflow_db_pool_in_use") == 0
    finally:
        await pool.close()


async def test_worker_reports_its_pool_use(worker: InProcessWorker) -> None:
    registry = worker.writer.metrics.registry
    async with asyncio.timeout(10):
        while not registry.get_sample_value("voteflow_db_pool_size"):
            await asyncio.sleep(0.05)
    assert registry.get_sample_value("voteflow_db_pool_in_use") is not None


async def test_edge_reports_its_pool_at_each_scrape(edge: Any) -> None:
    await edge.get("/api/polls")  # the pool has opened a connection
    text = await (await edge.get("/metrics")).text()
    sizes = re.findall(r"^voteflow_db_pool_size (\S+)$", text, re.MULTILINE)
    assert sizes and float(sizes[0]) >= 1, text
    assert re.search(r"^voteflow_db_pool_in_use \S+$", text, re.MULTILINE), text


async def test_a_second_worker_on_a_taken_metrics_port_says_which_setting_to_change(
    settings: Settings,
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ctx: dict[str, Any] = {SETTINGS: dataclasses.replace(settings, worker_metrics_port=port)}
        try:
            with pytest.raises(RuntimeError, match="VOTEFLOW_WORKER_METRICS_PORT"):
                await startup(ctx)
        finally:
            await shutdown(ctx)


async def test_workers_on_one_host_with_the_default_port_each_serve_their_own_metrics(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # The range's first port held by another process (an earlier worker, here
    # a socket) when it is free; whoever else holds ports of it, each worker
    # must still take a free one of its own and say which.
    holders = []
    with contextlib.suppress(OSError):
        holder = socket.socket()
        holder.bind(("127.0.0.1", WORKER_METRICS_PORTS[0]))
        holder.listen()
        holders.append(holder)
    unset = dataclasses.replace(settings, worker_metrics_port=None)
    contexts: list[dict[str, Any]] = [{SETTINGS: unset}, {SETTINGS: unset}]
    caplog.set_level("INFO", logger="workers.worker")
    try:
        for ctx in contexts:
            await startup(ctx)
        ports = [ctx[METRICS_RUNNER].addresses[0][1] for ctx in contexts]
        assert len(set(ports)) == 2, ports
        assert all(p in WORKER_METRICS_PORTS and p != WORKER_METRICS_PORTS[0] for p in ports)
        for port in ports:
            assert await _answers("127.0.0.1", port)
            assert f"worker metrics on 127.0.0.1 port {port}" in caplog.text
    finally:
        for ctx in contexts:
            await shutdown(ctx)
        for holder in holders:
            holder.close()


async def test_a_worker_finding_every_default_metrics_port_taken_says_what_to_set(
    settings: Settings,
) -> None:
    holders = []
    for port in WORKER_METRICS_PORTS:
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", port))
        except OSError:  # held already, as the test wants
            holder.close()
            continue
        holder.listen()
        holders.append(holder)
    ctx: dict[str, Any] = {SETTINGS: dataclasses.replace(settings, worker_metrics_port=None)}
    try:
        with pytest.raises(MetricsPortTaken, match="9464-9479 are all taken: set VOTEFLOW_"):
            await startup(ctx)
    finally:
        await shutdown(ctx)
        for holder in holders:
            holder.close()


async def _answers(address: str, port: int) -> bool:
    """A GET /metrics on address:port gets an answer (not a refused connection)."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://{address}:{port}/metrics") as response,
        ):
            return response.status == 200
    except aiohttp.ClientConnectorError:
        return False


@pytest.mark.parametrize(
    ("host", "reachable"),
    [(None, {"127.0.0.1"}), ("0.0.0.0", {"127.0.0.1", "127.0.0.2"})],
)
async def test_worker_metrics_listen_only_on_their_configured_address(
    settings: Settings, host: str | None, reachable: set[str]
) -> None:
    # None: the default, loopback. 127.0.0.2 stands for any other address of
    # the host (on Linux all of 127/8 is local, and a socket bound to
    # 127.0.0.1 does not accept on it), as another container's Prometheus would use.
    changes: dict[str, Any] = {"worker_metrics_port": 0}
    if host is not None:
        changes["worker_metrics_host"] = host
    ctx: dict[str, Any] = {SETTINGS: dataclasses.replace(settings, **changes)}
    try:
        await startup(ctx)
        bound, port = ctx[METRICS_RUNNER].addresses[0][:2]
        assert bound == (host or "127.0.0.1")
        answered = {a for a in ("127.0.0.1", "127.0.0.2") if await _answers(a, port)}
        assert answered == reachable
    finally:
        await shutdown(ctx)
