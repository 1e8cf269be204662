"""What the deployment files describe, run: the probes they name answer on a
running edge and worker, and each process drains within the grace period its
manifest gives it (the files themselves: tests/unit/test_deploy_files.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.cluster import REQUEST_TIMEOUT, Cluster, Flood, create_poll, stored_vote_ids, until
from tests.k8s import BASE, Rendered, drain_budget, main_container, render
from tests.support import drain
from voteflow.settings import PREFIX, Settings
from workers.metrics import WorkerMetrics
from workers.worker import _serve_metrics


async def test_the_probes_answer_200_on_a_running_edge_and_worker(
    edge: TestClient[Any, Any],
) -> None:
    rendered = Rendered(render(BASE))
    for probe in ("readinessProbe", "livenessProbe"):
        path = main_container(rendered.deployment("edge"))[probe]["httpGet"]["path"]
        response = await edge.get(path)
        assert response.status == 200, (path, await response.text())
    path = main_container(rendered.deployment("worker"))["livenessProbe"]["httpGet"]["path"]
    runner = await _serve_metrics(WorkerMetrics(), "127.0.0.1", 0)
    try:
        port = runner.addresses[0][1]
        async with (
            aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session,
            session.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            assert response.status == 200
    finally:
        await runner.cleanup()


async def test_sigterm_drains_the_edge_and_the_worker_within_their_grace_period(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """With votes in flight, an SSE watcher open and a backlog being written,
    each process exits 0 after SIGTERM well within the time its manifest gives
    it, and every vote answered 202 is counted once. Prints the drain times
    (`pytest -s`) that the manifests' grace periods are checked against."""
    rendered = Rendered(render(BASE))
    deployment = rendered.configured()
    # The deployment's settings, on this test's servers, keys and free ports.
    own = ("HOST", "PORT", "WORKER_METRICS_PORT", "WORKER_METRICS_HOST")
    own += ("RATE_LIMIT_PER_IP", "RATE_LIMIT_PER_VOTER")
    env = {k: v for k, v in deployment.items() if k.removeprefix(PREFIX) not in own}
    env.pop("VOTEFLOW_KEY_PREFIX")
    shaped = Settings.from_env(
        env,
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        key_prefix=settings.key_prefix,
    )
    cluster = Cluster(shaped, tmp_path, redis_client, env=env)
    drained: dict[str, float] = {}
    try:
        edges, workers = await cluster.start(edges=1, workers=1)
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
            poll = await create_poll(session, edges[0], ["A", "B"], allow_multiple_votes=True)
            watcher = await session.get(f"{edges[0].url}/api/polls/{poll['id']}/live")
            assert watcher.status == 200
            await watcher.content.readuntil(b"\n\n")  # the first tally
            flood = Flood(session, edges[0], poll)
            sending = flood.run(clients=32)
            await until(lambda: len(flood.accepted) >= 2000, 30, "2,000 votes accepted")
            for process, role in ((workers[0], "worker"), (edges[0], "edge")):
                started = time.monotonic()
                status = await process.terminate()
                drained[role] = time.monotonic() - started
                assert status == 0, process.log_tail()
            await flood.finish(sending)
            watcher.close()
            print(
                f"\nSIGTERM to exit: worker {drained['worker']:.2f} s, edge {drained['edge']:.2f} s"
            )
            budget = {role: drain_budget(rendered.deployment(role)) for role in ("edge", "worker")}
            for role, seconds in drained.items():
                assert seconds < budget[role] / 2, (
                    f"the {role} took {seconds:.1f} s of {budget[role]}"
                )
            # A new worker writes what was queued: no vote answered 202 is lost.
            await cluster.start(workers=1)
            await drain(redis_client, shaped, timeout=60)
            stored = await stored_vote_ids(shaped.database_url, poll["id"])
            assert len(stored) == len(set(stored))
            assert set(flood.accepted) <= set(stored) <= set(flood.accepted) | set(flood.unanswered)
    finally:
        problems = await cluster.close()
    assert not problems, "\n".join(problems)
