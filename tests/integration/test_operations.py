"""What operators rely on: health, readiness, metrics, and dead letters."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import InProcessWorker, ballot, create_poll, drain, edge_client
from voteflow.keys import Keys
from voteflow.message import FIELD, Vote
from voteflow.servers import free_port
from voteflow.settings import Settings
from voteflow.timeutil import now_us

Client = TestClient[Any, Any]


async def test_health_and_readiness(edge: Client) -> None:
    assert (await edge.get("/health")).status == 200
    response = await edge.get("/ready")
    assert response.status == 200
    assert await response.json() == {"status": "ready", "failing": []}


async def test_readiness_is_503_when_redis_is_unreachable(settings: Settings) -> None:
    # A port nothing listens on: the edge starts, but is not ready.
    broken = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with edge_client(broken) as client:
        assert (await client.get("/health")).status == 200
        response = await client.get("/ready")
        assert response.status == 503
        # The dependency is named; its error (an address, here) is not told.
        assert await response.json() == {"status": "unavailable", "failing": ["redis"]}
        # A vote that cannot be queued is a 503 with Retry-After, never a 202.
        poll = await create_poll(client)
        vote = {
            "poll_id": poll["id"],
            "option_ids": [poll["options"][0]["id"]],
            "voter_fingerprint": "f",
        }
        response = await client.post("/api/vote", json=vote)
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
        # Results still come from PostgreSQL.
        response = await client.get(f"/api/polls/{poll['id']}/results")
        assert response.status == 200


async def test_readiness_names_postgres_when_it_refuses_and_never_its_error(
    edge: Client, settings: Settings, pg_server_url: str
) -> None:
    database = settings.database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_server_url)
    try:
        # The edge's connections are cut and no new one is let in.
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database
        )
        response = await edge.get("/ready")
        assert response.status == 503
        raw = await response.text()
        assert orjson.loads(raw) == {"status": "unavailable", "failing": ["postgres"]}
        assert database not in raw
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    response = await edge.get("/ready")
    assert (response.status, await response.json()) == (200, {"status": "ready", "failing": []})


async def test_edge_metrics_count_requests_and_votes(edge: Client) -> None:
    poll = await create_poll(edge)
    body = ballot(poll)
    assert (await edge.post("/api/vote", json=body)).status == 202
    bad = await edge.post("/api/vote", data=b"{", headers={"Content-Type": "application/json"})
    assert bad.status == 400
    text = await (await edge.get("/metrics")).text()
    assert 'voteflow_http_requests_total{method="POST",route="/api/vote",status="202"} 1.0' in text
    assert 'voteflow_http_requests_total{method="POST",route="/api/vote",status="400"} 1.0' in text
    assert "voteflow_votes_accepted_total 1.0" in text
    assert 'voteflow_votes_rejected_total{reason="400"} 1.0' in text
    assert "voteflow_http_request_seconds_bucket" in text


async def test_unusual_methods_are_counted_as_one_series(edge: Client) -> None:
    for method in ("PROPFIND", "MKCOL"):
        assert (await edge.request(method, "/api/vote")).status == 405
    text = await (await edge.get("/metrics")).text()
    assert 'voteflow_http_requests_total{method="other",route="unmatched",status="405"} 2.0' in text
    assert "PROPFIND" not in text and "MKCOL" not in text


async def test_worker_metrics_are_served_on_their_own_port(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    poll = await create_poll(edge)
    body = ballot(poll)
    assert (await edge.post("/api/vote", json=body)).status == 202
    await drain(redis_client, settings)
    port = worker.ctx["voteflow_metrics_runner"].addresses[0][1]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    assert 'voteflow_votes_committed_total{outcome="counted"} 1.0' in text
    assert "voteflow_batches_total 1.0" in text
    assert "voteflow_end_to_end_lag_seconds_count 1.0" in text
    assert "voteflow_commit_seconds_count 1.0" in text
    assert 'voteflow_stream_backlog{shard="0"}' in text
    assert 'voteflow_stream_pending{shard="0"}' in text


async def test_poison_messages_go_to_dead_letters_and_do_not_block_the_shard(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    keys = Keys(settings.key_prefix, settings.stream_shards)
    poll = await create_poll(edge)
    unknown = Vote(str(uuid.uuid4()), str(uuid.uuid4()), "f:x", (str(uuid.uuid4()),), now_us())
    foreign = Vote(str(uuid.uuid4()), poll["id"], "f:y", (str(uuid.uuid4()),), now_us())
    stream = keys.stream(0)
    nul = Vote(str(uuid.uuid4()), poll["id"], "f:\x00", (poll["options"][0]["id"],), now_us())
    await redis_client.xadd(stream, {FIELD: b"not json"})
    await redis_client.xadd(stream, {FIELD: nul.encode()})
    await redis_client.xadd(stream, {b"other": b"field"})
    await redis_client.xadd(stream, {FIELD: unknown.encode()})
    await redis_client.xadd(stream, {FIELD: foreign.encode()})
    good = {
        "poll_id": poll["id"],
        "option_ids": [poll["options"][0]["id"]],
        "voter_fingerprint": "z",
    }
    assert (await edge.post("/api/vote", json=good)).status == 202
    await drain(redis_client, settings)
    dead = await redis_client.xrange(keys.dead_letters(0))
    reasons = sorted(fields[b"reason"].decode().split(":")[0] for _, fields in dead)
    assert reasons == ["invalid", "undecodable", "undecodable", "undecodable", "unknown_poll"]
    results = await (await edge.get(f"/api/polls/{poll['id']}/results")).json()
    assert results["total_ballots"] == 1


async def test_admin_token_is_never_logged(
    edge: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = {"Authorization": "Bearer not-the-token-but-secret-too"}
    right = {"Authorization": f"Bearer {settings.admin_token}", "Content-Type": "application/json"}
    body = {"question": "Q?", "options": ["a", "b"]}
    assert (await edge.post("/api/polls", json=body, headers=wrong)).status == 401
    response = await edge.post("/api/polls", json=body, headers=right)
    assert response.status == 201
    poll = await response.json()
    assert (await edge.post(f"/api/polls/{poll['id']}/close", headers=right)).status == 200
    assert caplog.records, "nothing was logged at all: the check would prove nothing"
    assert settings.admin_token not in caplog.text
    assert "not-the-token-but-secret-too" not in caplog.text
