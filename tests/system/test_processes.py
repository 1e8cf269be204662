"""voteflow as it runs in production: edges and workers as separate OS processes.

Each test starts ``python -m voteflow edge`` and ``python -m voteflow worker``
processes against its own database and key prefix, talks to the edges over
HTTP, signals the processes the way a supervisor would, and checks the tallies
against the rules and against a recount of the votes table.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from tests.cluster import (
    REQUEST_TIMEOUT,
    Cluster,
    Flood,
    check_counted_once,
    count_votes,
    create_poll,
    get_results,
    option_ids_of,
    post_vote,
    stored_vote_ids,
    tally_of,
    until,
)
from tests.support import drain, recount, shell_env, votes_by_option
from voteflow.settings import Settings

# -- many voters at once ------------------------------------------------------


@dataclass
class Ledger:
    """What the voters were told, from which the tallies follow by the rules."""

    # poll id -> every vote_id answered 202
    accepted: dict[str, set[str]] = field(default_factory=dict)
    # single-vote polls: (poll id, voter) -> options of the voter's last new ballot
    latest: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    # multiple-vote polls: vote_id -> options (a retried vote_id is one entry)
    ballots: dict[str, tuple[str, ...]] = field(default_factory=dict)


async def test_several_edges_and_workers_count_thousands_of_concurrent_votes_exactly(
    cluster: Cluster, settings: Settings, redis_client: aioredis.Redis
) -> None:
    edges, _ = await cluster.start(edges=2, workers=2)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        polls = [
            await create_poll(session, edges[0], ["A", "B", "C", "D"]),
            await create_poll(
                session, edges[1], ["A", "B", "C"], allow_multiple_votes=True, max_choices=2
            ),
            await create_poll(session, edges[0], ["X", "Y", "Z"]),
        ]
        ledger = Ledger(accepted={poll["id"]: set() for poll in polls})
        requests = 0

        async def send(body: dict[str, Any]) -> str:
            nonlocal requests
            requests += 1
            return await post_vote(session, edges[requests % len(edges)], body)

        async def voter(n: int) -> None:
            rng = random.Random(n)
            # Every fourth voter is a signed-in user on a new device each time:
            # the user_id, not the fingerprint, is the voter.
            signed_in = n % 4 == 0
            voter = f"user-{n}" if signed_in else f"fp-{n}"
            retriable: list[dict[str, Any]] = []
            for step in range(rng.randint(3, 5)):
                poll = rng.choices(polls, weights=(4, 4, 2))[0]
                chosen = rng.sample(option_ids_of(poll), rng.randint(1, poll["max_choices"]))
                body: dict[str, Any] = {"poll_id": poll["id"], "option_ids": chosen}
                if signed_in:
                    body |= {"user_id": voter, "voter_fingerprint": f"device-{n}-{step}"}
                else:
                    body["voter_fingerprint"] = voter
                if rng.random() < 0.8:  # the client chose the vote_id, so it may retry
                    body["vote_id"] = str(uuid.uuid4())
                # A client that timed out sends the same ballot again while
                # the first is still in flight, to another edge.
                copies = rng.choice((2, 3)) if "vote_id" in body and rng.random() < 0.2 else 1
                answers = await asyncio.gather(*(send(body) for _ in range(copies)))
                assert len(set(answers)) == 1, answers
                vote_id = answers[0]
                ledger.accepted[poll["id"]].add(vote_id)
                if poll["allow_multiple_votes"]:
                    ledger.ballots[vote_id] = tuple(chosen)
                else:
                    ledger.latest[(poll["id"], voter)] = tuple(chosen)
                if retriable and rng.random() < 0.3:
                    # A late retry of an earlier ballot, after a later one.
                    earlier = rng.choice(retriable)
                    assert await send(earlier) == earlier["vote_id"]
                if "vote_id" in body:
                    retriable.append(body)

        async with asyncio.timeout(60):
            await asyncio.gather(*(voter(n) for n in range(500)))
        await drain(redis_client, settings, timeout=60)

        assert requests >= 2000, requests
        for poll in polls:
            options = option_ids_of(poll)
            if poll["allow_multiple_votes"]:
                ballots = [ledger.ballots[v] for v in ledger.accepted[poll["id"]]]
            else:
                ballots = [b for (p, _), b in ledger.latest.items() if p == poll["id"]]
            expected = tally_of(ballots, options)
            for edge in edges:
                result = await get_results(session, edge, poll["id"])
                assert votes_by_option(result) == expected
                assert result["total_ballots"] == len(ballots)
            assert await recount(settings.database_url, poll["id"]) == expected
            stored = await stored_vote_ids(settings.database_url, poll["id"])
            assert len(stored) == len(set(stored))
            assert set(stored) == ledger.accepted[poll["id"]]


# -- signals ------------------------------------------------------------------


async def test_worker_sigterm_finishes_its_batch_and_exits_promptly(
    cluster: Cluster, settings: Settings, redis_client: aioredis.Redis
) -> None:
    (edge,), (worker,) = await cluster.start(edges=1, workers=1)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B", "C"], allow_multiple_votes=True)
        flood = Flood(session, edge, poll)
        sending = flood.run(clients=64)
        try:
            # The worker is busy committing a stream that keeps growing.
            async def committed() -> bool:
                return await count_votes(settings.database_url) >= 500

            await until(committed, timeout=30, what="the worker commits 500 votes")
            status = await worker.terminate()
            assert status == 0, worker.log_tail()
            # Votes keep arriving while no worker runs.
            before = len(flood.accepted)
            await until(
                lambda: len(flood.accepted) >= before + 200,
                timeout=15,
                what="200 more votes accepted",
            )
        finally:
            await flood.finish(sending)
        assert set(flood.statuses) == {202}, flood.statuses
        assert not flood.errors, flood.errors[:3]
        # It finished what it had read: committed and acknowledged, nothing
        # left pending for another worker to reclaim.
        for shard, consumer in enumerate(await cluster.consumers_of(worker)):
            assert consumer is not None and consumer["pending"] == 0, (shard, consumer)
        await cluster.start(workers=1)
        await drain(redis_client, settings, timeout=60)
        await check_counted_once(session, edge, settings, poll, flood.accepted)


async def test_edge_sigterm_answers_requests_in_flight_and_exits(
    cluster: Cluster, settings: Settings, redis_client: aioredis.Redis
) -> None:
    (edge,), _ = await cluster.start(edges=1, workers=1)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B", "C"], allow_multiple_votes=True)
        flood = Flood(session, edge, poll)
        sending = flood.run(clients=64, stop_on_connection_error=True)
        try:
            await until(lambda: len(flood.accepted) >= 500, timeout=30, what="500 votes accepted")
            signalled = time.monotonic()
            status = await edge.terminate()
            assert status == 0, edge.log_tail()
        finally:
            await flood.finish(sending)
        # Each request was answered 202 or lost with its connection; none got
        # a 5xx (or any other status) from the edge shutting down.
        assert set(flood.statuses) == {202}, flood.statuses
        assert all(isinstance(e, aiohttp.ClientConnectionError) for e in flood.errors)
        # Requests it was handling when the signal came were answered.
        answered_late = sum(1 for t in flood.accepted_at if t > signalled)
        assert answered_late > 0
        # A request that lost its connection was never queued: the edge
        # answers every vote it appends.
        await drain(redis_client, settings, timeout=60)
        stored = set(await stored_vote_ids(settings.database_url, poll["id"]))
        assert not stored & set(flood.unanswered)
        # Their clients retry on another edge, with the same vote_ids.
        (other,), _ = await cluster.start(edges=1)
        for vote_id, body in flood.unanswered.items():
            assert await post_vote(session, other, body) == vote_id
        await drain(redis_client, settings, timeout=60)
        await check_counted_once(
            session, other, settings, poll, {**flood.accepted, **flood.unanswered}
        )


# -- a rule that needs a backlog ---------------------------------------------


async def test_resent_vote_id_queued_behind_a_later_ballot_does_not_replace_it(
    cluster: Cluster, settings: Settings, redis_client: aioredis.Redis
) -> None:
    (edge,), (worker,) = await cluster.start(edges=1, workers=1)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        poll = await create_poll(session, edge, ["A", "B"])
        a, b = option_ids_of(poll)
        first = {"poll_id": poll["id"], "option_ids": [a], "voter_fingerprint": "v"}
        # The edge chooses this vote_id; the ballot is committed.
        first["vote_id"] = await post_vote(session, edge, first)
        await drain(redis_client, settings, timeout=30)
        # While no worker runs (a restart, a backlog), the voter votes B, then
        # its client sends the first ballot again with the vote_id it was given.
        assert await worker.terminate() == 0
        later = {"poll_id": poll["id"], "option_ids": [b], "voter_fingerprint": "v"}
        await post_vote(session, edge, later)
        assert await post_vote(session, edge, first) == first["vote_id"]
        await cluster.start(workers=1)
        await drain(redis_client, settings, timeout=30)
        result = await get_results(session, edge, poll["id"])
        assert await recount(settings.database_url, poll["id"]) == votes_by_option(result)
        assert votes_by_option(result) == {a: 0, b: 1}


async def test_a_second_worker_on_a_taken_metrics_port_stops_with_one_line_naming_the_setting(
    settings: Settings,
) -> None:
    # Another worker (here: a listening socket) holds the port.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    env = shell_env(
        VOTEFLOW_DATABASE_URL=settings.database_url,
        VOTEFLOW_REDIS_URL=settings.redis_url,
        VOTEFLOW_KEY_PREFIX=settings.key_prefix,
        VOTEFLOW_WORKER_METRICS_PORT=str(port),
    )
    try:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voteflow", "worker",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(worker.communicate(), 60)
    finally:
        holder.close()
    assert worker.returncode == 2, err.decode()
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith(f"voteflow worker: the worker's metrics port {port} is taken"), last
    assert "VOTEFLOW_WORKER_METRICS_PORT" in last
    assert "Traceback" not in err.decode(), err.decode()
