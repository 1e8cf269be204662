"""Votes for poll ids that name no poll: remembered briefly apart from the real
polls, and counted against the client address's rate limit, so that made-up
ids neither read PostgreSQL without bound nor evict real polls from the cache."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from ingest.app import EDGE
from tests.support import ballot, create_poll, edge_client
from voteflow.servers import RedisServer
from voteflow.settings import Settings

Client = TestClient[Any, Any]
FLOODER = "203.0.113.7"
VOTER = "198.51.100.20"


def _behind_proxy(settings: Settings, **changes: Any) -> Settings:
    # The test's client is a trusted proxy: X-Forwarded-For names the address.
    return dataclasses.replace(settings, trusted_proxies="127.0.0.1", **changes)


async def _vote(edge: Client, body: dict[str, Any], address: str) -> Any:
    return await edge.post("/api/vote", json=body, headers={"X-Forwarded-For": address})


def _made_up(poll_id: str | None = None) -> dict[str, Any]:
    return {
        "poll_id": poll_id or str(uuid.uuid4()),
        "option_ids": [str(uuid.uuid4())],
        "voter_fingerprint": "v",
    }


async def _poll_reads(edge: Client, found: bool) -> int:
    text = await (await edge.get("/metrics")).text()
    match = re.search(
        rf'^voteflow_poll_reads_total{{found="{str(found).lower()}"}} (\S+)$', text, re.M
    )
    return 0 if match is None else int(float(match.group(1)))


async def test_votes_for_one_unknown_poll_id_read_postgres_once_while_it_is_remembered(
    settings: Settings,
) -> None:
    async with edge_client(_behind_proxy(settings)) as edge:
        body = _made_up()
        answers = await asyncio.gather(*(_vote(edge, body, FLOODER) for _ in range(10)))
        answers += [await _vote(edge, body, FLOODER) for _ in range(20)]
        assert {answer.status for answer in answers} == {404}
        assert (await answers[-1].json())["field"] == "poll_id"
        assert await _poll_reads(edge, found=False) == 1


async def test_votes_for_random_poll_ids_count_against_the_address_limit_and_stop_reading_postgres(
    settings: Settings,
) -> None:
    limit = 10
    async with edge_client(_behind_proxy(settings, rate_limit_per_ip=limit)) as edge:
        poll = await create_poll(edge)
        statuses = [(await _vote(edge, _made_up(), FLOODER)).status for _ in range(4 * limit)]
        assert statuses == [404] * limit + [429] * (3 * limit), statuses
        refused = await _vote(edge, _made_up(), FLOODER)
        assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
        assert set(await refused.json()) == {"error"}
        # Over its limit, the address's votes no longer reach PostgreSQL: the
        # first one over it read and was refused, those after were not read.
        assert await _poll_reads(edge, found=False) == limit + 1
        # Its real ballots are refused as well: one allowance for both.
        assert (await _vote(edge, ballot(poll), FLOODER)).status == 429
        # Another address is not held back.
        assert (await _vote(edge, _made_up(), VOTER)).status == 404
        assert (await _vote(edge, ballot(poll, "w"), VOTER)).status == 202


async def test_a_real_poll_stays_cached_while_unknown_poll_ids_flood(settings: Settings) -> None:
    async with edge_client(_behind_proxy(settings, poll_cache_ttl=60.0)) as edge:
        poll = await create_poll(edge)
        assert (await _vote(edge, ballot(poll, "a"), VOTER)).status == 202
        assert await _poll_reads(edge, found=True) == 1
        flood = 200
        for _ in range(flood // 20):
            answers = await asyncio.gather(*(_vote(edge, _made_up(), FLOODER) for _ in range(20)))
            assert {answer.status for answer in answers} == {404}
        assert await _poll_reads(edge, found=False) == flood
        # The made-up ids took no place in the poll cache: the poll is still
        # there, and its next ballot is checked without reading it again.
        assert edge.app[EDGE].polls.size == 1
        assert (await _vote(edge, ballot(poll, "b"), VOTER)).status == 202
        assert await _poll_reads(edge, found=True) == 1


async def test_an_unknown_poll_id_is_forgotten_after_the_poll_cache_ttl(
    settings: Settings,
) -> None:
    # A poll's id is drawn by PostgreSQL when it is created, so an id cannot
    # be remembered as unknown before its poll exists; still, the memory is
    # as short as a cached poll's (and closing a poll drops both).
    ttl = 0.5
    async with edge_client(_behind_proxy(settings, poll_cache_ttl=ttl)) as edge:
        body = _made_up()
        assert (await _vote(edge, body, VOTER)).status == 404
        assert (await _vote(edge, body, VOTER)).status == 404
        assert await _poll_reads(edge, found=False) == 1
        await asyncio.sleep(ttl + 0.1)
        assert (await _vote(edge, body, VOTER)).status == 404
        assert await _poll_reads(edge, found=False) == 2


async def test_votes_for_random_poll_ids_are_limited_per_address_on_a_cluster(
    on_cluster: Settings,
) -> None:
    # 16 a minute over 8 shards: 2 per shard limiter of the address. Made-up
    # ids spread over its limiters; once one refuses, the address waits.
    limited = _behind_proxy(on_cluster, rate_limit_per_ip=16)
    async with edge_client(limited) as edge:
        statuses = [(await _vote(edge, _made_up(), FLOODER)).status for _ in range(40)]
        reads = await _poll_reads(edge, found=False)
    served = statuses.index(429)
    assert 2 <= served <= 16, statuses
    assert statuses == [404] * served + [429] * (40 - served), statuses
    assert reads == served + 1


async def test_a_vote_for_no_poll_while_redis_is_away_is_503_not_500(
    settings: Settings, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        away = _behind_proxy(settings, redis_url=server.url, rate_limit_per_ip=10)
        async with edge_client(away) as edge:
            assert (await _vote(edge, _made_up(), FLOODER)).status == 404
            server.stop()
            answer = await _vote(edge, _made_up(), FLOODER)
            assert answer.status == 503, await answer.text()
            assert int(answer.headers["Retry-After"]) >= 1
