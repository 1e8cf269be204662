"""voteflow behind nginx, configured by infra/nginx/voteflow.conf.

Each test starts two edges (and a worker when votes must be counted) as OS
processes that trust 127.0.0.1 as their proxy, and Debian's nginx in front of
them with the repository's configuration (tests/nginx.py). Clients talk only to
nginx, from loopback addresses of their own (127.0.0.2 and up: all of 127/8 is
local on Linux), so that nginx and the edges see different client addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yarl

from tests.cluster import (
    REQUEST_TIMEOUT,
    Cluster,
    Process,
    check_counted_once,
    option_ids_of,
    stored_vote_ids,
    until,
)
from tests.nginx import (
    EDGE_TOO_MANY,
    NGINX_TOO_MANY,
    Nginx,
    established_to,
    live_streams_per_client,
    metric,
    nginx_binary,
)
from tests.support import ADMIN
from voteflow.settings import Settings

NGINX = nginx_binary()
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)"
)

# What a live watcher may wait for a tally event that nginx passes straight on.
LIVE_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def behind_nginx(
    cluster: Cluster, tmp_path: Path, workers: int, real_ip_from: str = "", **env: str
) -> AsyncIterator[tuple[Nginx, list[Process]]]:
    """Two edges (and `workers` workers) that believe nginx's X-Forwarded-For,
    with nginx in front; nginx is stopped on the way out, the processes by the
    cluster fixture. `real_ip_from`: see tests.nginx.Nginx."""
    cluster.env.update(VOTEFLOW_TRUSTED_PROXIES="127.0.0.1", **env)
    edges, _ = await cluster.start(edges=2, workers=workers)
    assert NGINX is not None
    nginx = Nginx(NGINX, tmp_path, [edge.url for edge in edges], real_ip_from)
    try:
        await nginx.start()
        yield nginx, edges
    finally:
        await nginx.stop()


def client_from(nginx: Nginx, address: str, limit: int = 100) -> aiohttp.ClientSession:
    """A client of nginx (over TLS) whose connections come from `address` (a 127/8 address)."""
    return nginx.session(address, limit)


async def create_poll(nginx: Nginx, labels: list[str], **fields: Any) -> dict[str, Any]:
    body = {"question": "Which one?", "options": labels, **fields}
    async with (
        nginx.session() as session,
        session.post(f"{nginx.url}/api/polls", json=body, headers=ADMIN) as response,
    ):
        assert response.status == 201, await response.text()
        poll: dict[str, Any] = await response.json()
        return poll


def ballot(poll: dict[str, Any], voter: str, option: int = 0) -> dict[str, Any]:
    return {
        "poll_id": poll["id"],
        "option_ids": [option_ids_of(poll)[option]],
        "voter_fingerprint": voter,
        "vote_id": str(uuid.uuid4()),
    }


async def vote(
    session: aiohttp.ClientSession, nginx: Nginx, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, Any], str | None]:
    """Status, JSON body and Retry-After of one vote sent through nginx."""
    async with session.post(f"{nginx.url}/api/vote", json=body, headers=headers) as response:
        answer = orjson.loads(await response.read())
        return response.status, answer, response.headers.get("Retry-After")


async def edge_metrics(edges: list[Process]) -> list[str]:
    """Each edge's /metrics text, read from the edge itself (not through nginx)."""
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        texts = []
        for edge in edges:
            async with session.get(f"{edge.url}/metrics") as response:
                assert response.status == 200
                texts.append(await response.text())
        return texts


def edge_ports(edges: list[Process]) -> set[int]:
    return {int(edge.url.rsplit(":", 1)[1]) for edge in edges}


# -- votes --------------------------------------------------------------------


async def test_votes_through_nginx_are_counted_exactly_once_and_spread_over_both_edges(
    cluster: Cluster, settings: Settings, tmp_path: Path
) -> None:
    clients, votes_each, in_flight = 6, 50, 10
    async with behind_nginx(cluster, tmp_path, workers=1, VOTEFLOW_RATE_LIMIT_PER_IP="600") as (
        nginx,
        edges,
    ):
        poll = await create_poll(nginx, ["A", "B", "C"], allow_multiple_votes=True)
        accepted: dict[str, dict[str, Any]] = {}
        statuses: list[int] = []

        async def client(n: int) -> None:
            async with client_from(nginx, f"127.0.0.{10 + n}") as session:
                pending = [ballot(poll, f"nginx-{n}", i % 3) for i in range(votes_each)]
                while pending:
                    batch, pending = pending[:in_flight], pending[in_flight:]
                    answers = await asyncio.gather(*(vote(session, nginx, b) for b in batch))
                    for body, (status, answer, _) in zip(batch, answers, strict=True):
                        statuses.append(status)
                        if status == 202:
                            assert answer["vote_id"] == body["vote_id"]
                            accepted[body["vote_id"]] = body

        started = time.monotonic()
        async with asyncio.timeout(60):
            await asyncio.gather(*(client(n) for n in range(clients)))
        sent_in = time.monotonic() - started
        total = clients * votes_each
        assert statuses == [202] * total, sorted(set(statuses))

        # nginx keeps its connections to the edges open for the next requests
        # (upstream keepalive): without it none would be left once all answered.
        ports = edge_ports(edges)
        await until(
            lambda: 0 < established_to(ports) <= nginx.keepalive(),
            timeout=5,
            what="nginx holds idle keep-alive connections to the edges",
        )
        idle = established_to(ports)

        async def all_stored() -> bool:
            return len(await stored_vote_ids(settings.database_url, poll["id"])) >= total

        await until(all_stored, timeout=30, what=f"the worker stores {total} votes")
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            await check_counted_once(session, edges[0], settings, poll, accepted)

        # Both edges took votes (least_conn), and the two counts add up to
        # every vote: nginx passed each vote to exactly one edge.
        served = [
            metric(text, "voteflow_votes_accepted_total") for text in await edge_metrics(edges)
        ]
        assert all(n > 0 for n in served), served
        assert sum(served) == total, served
        print(
            f"\n{total} votes from {clients} addresses in {sent_in:.2f}s through nginx: "
            f"edges took {served[0]:.0f} and {served[1]:.0f}; "
            f"{idle} keep-alive connections to them left open"
        )


async def test_edge_rate_limit_counts_each_client_behind_nginx_not_nginx(
    cluster: Cluster, tmp_path: Path
) -> None:
    limit = 5  # per minute, far under nginx's own burst: only the edges refuse here
    async with behind_nginx(
        cluster, tmp_path, workers=0, VOTEFLOW_RATE_LIMIT_PER_IP=str(limit)
    ) as (nginx, edges):
        poll = await create_poll(nginx, ["A", "B"])
        async with (
            client_from(nginx, "127.0.0.2") as first,
            client_from(nginx, "127.0.0.3") as second,
        ):
            # The first client spends its whole limit. It also writes an
            # X-Forwarded-For of its own on each vote: nginx appends the
            # address it saw, and the edges take that one, so a forged header
            # buys nothing.
            for n in range(limit):
                status, answer, _ = await vote(
                    first,
                    nginx,
                    ballot(poll, f"first-{n}"),
                    **{"X-Forwarded-For": f"198.51.100.{n}"},
                )
                assert status == 202, answer
            status, answer, retry_after = await vote(
                first, nginx, ballot(poll, "first-over"), **{"X-Forwarded-For": "198.51.100.99"}
            )
            assert status == 429, answer
            assert answer["error"] == EDGE_TOO_MANY  # the edge's answer, not nginx's
            assert retry_after is not None and int(retry_after) >= 1
            # The second client comes through the same nginx, and is not limited.
            status, answer, _ = await vote(second, nginx, ballot(poll, "second"))
            assert status == 202, answer

        texts = await edge_metrics(edges)
        assert sum(metric(t, "voteflow_rate_limited_total") for t in texts) == 1
        assert sum(metric(t, "voteflow_votes_accepted_total") for t in texts) == limit + 1


async def test_nginx_refuses_a_client_flooding_faster_than_its_burst_before_any_edge(
    cluster: Cluster, tmp_path: Path
) -> None:
    # The edges' own limit is out of the way: every vote nginx passes is taken.
    flood = 1000
    async with behind_nginx(cluster, tmp_path, workers=0, VOTEFLOW_RATE_LIMIT_PER_IP="1000000") as (
        nginx,
        edges,
    ):
        poll = await create_poll(nginx, ["A", "B"])
        answers: list[tuple[int, dict[str, Any], str | None]] = []
        async with (
            client_from(nginx, "127.0.0.4") as flooder,
            client_from(nginx, "127.0.0.5") as bystander,
        ):
            started = time.monotonic()
            async with asyncio.timeout(60):
                answers = await asyncio.gather(
                    *(vote(flooder, nginx, ballot(poll, f"flood-{n}")) for n in range(flood))
                )
            elapsed = time.monotonic() - started
            # Another address is not held back by the flood.
            status, answer, _ = await vote(bystander, nginx, ballot(poll, "bystander"))
            assert status == 202, answer

        accepted = sum(status == 202 for status, _, _ in answers)
        refused = [(answer, retry) for status, answer, retry in answers if status == 429]
        assert accepted + len(refused) == flood, sorted({status for status, _, _ in answers})
        assert all(answer["error"] == NGINX_TOO_MANY and retry == "1" for answer, retry in refused)
        # limit_req lets the burst through at once, then its rate: at most
        # 1 + 600 + 20 a second of the flood (and 1 for millisecond rounding).
        assert 0 < accepted <= 602 + 20 * elapsed, (accepted, elapsed)
        assert refused

        # What nginx refused never reached an edge.
        texts = await edge_metrics(edges)
        votes_seen = sum(
            metric(t, "voteflow_http_requests_total", route="/api/vote", method="POST")
            for t in texts
        )
        assert votes_seen == accepted + 1  # and the bystander's
        print(
            f"\nnginx: {flood} votes from one address in {elapsed:.2f}s: "
            f"{accepted} passed to the edges, {len(refused)} refused 429"
        )


async def test_nginx_counts_the_addresses_of_one_ipv6_64_as_one_client(
    cluster: Cluster, tmp_path: Path
) -> None:
    # nginx believes the X-Forwarded-For of loopback (realip, as behind a load
    # balancer), so each vote comes from the IPv6 address the test names.
    flood, addresses = 800, 20
    one_64 = [f"2001:db8:77:1:{n:x}::{n + 1:x}" for n in range(addresses)]
    async with behind_nginx(
        cluster, tmp_path, workers=0, real_ip_from="127.0.0.0/8",
        VOTEFLOW_RATE_LIMIT_PER_IP="1000000",
    ) as (nginx, edges):  # fmt: skip
        poll = await create_poll(nginx, ["A", "B"])
        async with client_from(nginx, "127.0.0.7") as session:
            started = time.monotonic()
            async with asyncio.timeout(60):
                answers = await asyncio.gather(*(
                    vote(session, nginx, ballot(poll, f"v6-{n}"),
                         **{"X-Forwarded-For": one_64[n % addresses]})
                    for n in range(flood)
                ))  # fmt: skip
            elapsed = time.monotonic() - started
            # Another /64 (and an IPv4 client) each have an allowance of their own.
            for other in ("2001:db8:77:2::1", "198.51.100.20"):
                status, answer, _ = await vote(
                    session, nginx, ballot(poll, other), **{"X-Forwarded-For": other}
                )
                assert status == 202, (other, answer)
        # What nginx refused never reached an edge.
        texts = await edge_metrics(edges)

    votes_seen = sum(
        metric(t, "voteflow_http_requests_total", route="/api/vote", method="POST") for t in texts
    )
    accepted = sum(status == 202 for status, _, _ in answers)
    assert votes_seen == accepted + 2
    refused = [answer for status, answer, _ in answers if status == 429]
    assert accepted + len(refused) == flood, sorted({status for status, _, _ in answers})
    assert all(answer["error"] == NGINX_TOO_MANY for answer in refused)
    # One allowance for the whole /64: the burst of 600 and 20 a second, as
    # for one address (each address of its own would have passed all 800).
    assert 0 < accepted <= 602 + 20 * elapsed, (accepted, elapsed)
    print(
        f"\nnginx: {flood} votes from {addresses} addresses of one /64 in {elapsed:.2f}s: "
        f"{accepted} passed, {len(refused)} refused 429"
    )


async def test_nginx_answers_its_own_errors_in_the_api_shape(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with behind_nginx(cluster, tmp_path, workers=0) as (nginx, edges):
        poll = await create_poll(nginx, ["A", "B"])
        async with client_from(nginx, "127.0.0.6") as session:
            too_large = ballot(poll, "big") | {"padding": "x" * 5000}
            async with session.post(f"{nginx.url}/api/vote", json=too_large) as response:
                assert response.status == 413
                assert response.content_type == "application/json"
                assert "error" in orjson.loads(await response.read())
            # nginx's own limit: the edges never saw it.
            texts = await edge_metrics(edges)
            assert (
                sum(metric(t, "voteflow_http_requests_total", route="/api/vote") for t in texts)
                == 0
            )

            for edge in edges:
                assert await edge.terminate() == 0, edge.log_tail()
            status, answer, retry_after = await vote(session, nginx, ballot(poll, "nobody home"))
            assert status == 503, answer
            assert "error" in answer
            assert retry_after == "1"


async def test_the_page_of_the_address_nginx_serves_may_vote_and_another_may_not(
    cluster: Cluster, tmp_path: Path
) -> None:
    # nginx listens on a port that is not 80: the browser's Origin carries it,
    # and nginx's $host would drop it. The edges see nginx's X-Forwarded-Host.
    async with behind_nginx(cluster, tmp_path, workers=0) as (nginx, _):
        poll = await create_poll(nginx, ["A", "B"])
        async with client_from(nginx, "127.0.0.7") as session:
            status, answer, _ = await vote(session, nginx, ballot(poll, "page"), Origin=nginx.url)
            assert status == 202, answer
            elsewhere = {"Origin": "https://evil.example"}
            status, answer, _ = await vote(session, nginx, ballot(poll, "evil"), **elsewhere)
            assert status == 403, answer
            # A client's own X-Forwarded-Host is replaced by nginx's.
            forged = {"Origin": "https://evil.example", "X-Forwarded-Host": "evil.example"}
            status, answer, _ = await vote(session, nginx, ballot(poll, "forged"), **forged)
            assert status == 403, answer


# -- TLS ----------------------------------------------------------------------

HSTS = "max-age=63072000"


async def handshake(nginx: Nginx, version: ssl.TLSVersion) -> str | None:
    """The TLS version nginx agrees to when a client offers only `version`,
    None if it refuses the handshake."""
    context = ssl.create_default_context(cafile=nginx.certificate)
    # This client may offer TLS 1.0 and 1.1 (OpenSSL's security level would
    # forbid them): a refusal is then nginx's.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", nginx.port, ssl=context)
    except (ssl.SSLError, ConnectionResetError):
        return None
    agreed = writer.get_extra_info("ssl_object").version()
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
        await writer.wait_closed()
    return str(agreed)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_nginx_speaks_tls_1_2_and_1_3_only_and_sends_hsts(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with behind_nginx(cluster, tmp_path, workers=0) as (nginx, _):
        assert await handshake(nginx, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        assert await handshake(nginx, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        assert await handshake(nginx, ssl.TLSVersion.TLSv1_1) is None
        assert await handshake(nginx, ssl.TLSVersion.TLSv1) is None
        async with nginx.session() as session:
            # An edge's answer and nginx's own both tell the browser to stay on HTTPS.
            async with session.get(f"{nginx.url}/api/polls") as response:
                assert response.status == 200
                assert response.headers["Strict-Transport-Security"] == HSTS
            async with session.post(f"{nginx.url}/api/vote", data=b"x" * 5000) as response:
                assert response.status == 413
                assert response.headers["Strict-Transport-Security"] == HSTS


async def test_plain_http_is_redirected_to_https_and_never_reaches_an_edge(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with behind_nginx(cluster, tmp_path, workers=0) as (nginx, edges):
        poll = await create_poll(nginx, ["A", "B"])
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            async with session.get(
                f"{nginx.http_url}/polls/{poll['id']}?x=1", allow_redirects=False
            ) as response:
                assert response.status == 301
                location = f"https://127.0.0.1/polls/{poll['id']}?x=1"
                assert response.headers["Location"] == location
                # No HSTS over plain HTTP: browsers ignore it there (RFC 6797).
                assert "Strict-Transport-Security" not in response.headers
            async with session.post(
                f"{nginx.http_url}/api/vote", json=ballot(poll, "plain"), allow_redirects=False
            ) as response:
                assert response.status == 301
        texts = await edge_metrics(edges)
        assert sum(metric(t, "voteflow_http_requests_total", route="/api/vote") for t in texts) == 0


# -- what nginx keeps to itself ------------------------------------------------


async def test_nginx_answers_404_for_metrics_and_ready_which_the_edges_still_serve(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Spellings that reach the same path once nginx has normalised it.
    paths = [
        "/metrics", "/ready", "/metrics?format=text", "//metrics", "/%6Detrics",
        "/%72eady", "/api/../metrics", "/static/%2E%2E/ready",
    ]  # fmt: skip
    async with behind_nginx(cluster, tmp_path, workers=0) as (nginx, edges):
        async with client_from(nginx, "127.0.0.9") as session:
            for path in paths:
                url = yarl.URL(nginx.url + path, encoded=True)  # sent as written
                async with session.get(url) as response:
                    assert response.status == 404, path
                    assert response.content_type == "application/json"
                    assert orjson.loads(await response.read()) == {"error": "Not Found"}
            # The routes next to them still reach an edge.
            async with session.get(f"{nginx.url}/health") as response:
                assert response.status == 200
        # Prometheus and the probes, which go to an edge itself, are served.
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            for edge in edges:
                for path in ("/metrics", "/ready"):
                    async with session.get(f"{edge.url}{path}") as response:
                        assert response.status == 200, (edge.url, path)
    # nginx answered each of them itself: no upstream in its access log.
    lines = (tmp_path / "access.log").read_text().splitlines()
    refused = [line for line in lines if " 404 " in line]
    assert len(refused) == len(paths), lines
    assert all(line.split(" 404 ")[1].startswith("- ") for line in refused), refused


# -- live tallies -------------------------------------------------------------


async def next_sse_tally(content: aiohttp.StreamReader) -> dict[str, Any]:
    """The data of the next `tally` event on an SSE stream (heartbeats skipped)."""
    event, data = None, None
    while True:
        line = (await content.readline()).decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and event == "tally" and data is not None:
            tally: dict[str, Any] = orjson.loads(data)
            return tally


async def test_sse_tallies_flow_through_nginx_while_the_stream_stays_open(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with behind_nginx(cluster, tmp_path, workers=1) as (nginx, _):
        poll = await create_poll(nginx, ["A", "B"])
        async with (
            client_from(nginx, "127.0.0.7") as session,
            session.get(
                f"{nginx.url}/api/polls/{poll['id']}/live",
                timeout=aiohttp.ClientTimeout(total=None, sock_read=LIVE_TIMEOUT),
            ) as stream,
        ):
            assert stream.status == 200
            assert stream.content_type == "text/event-stream"
            async with asyncio.timeout(LIVE_TIMEOUT):
                first = await next_sse_tally(stream.content)
            assert first["total_ballots"] == 0

            status, answer, _ = await vote(session, nginx, ballot(poll, "watcher", 1))
            assert status == 202, answer
            voted = time.monotonic()
            # Events arrive while the stream is open: nginx does not hold them
            # until the response ends (which it never does here).
            async with asyncio.timeout(LIVE_TIMEOUT):
                tally = first
                while tally["total_ballots"] < 1:
                    tally = await next_sse_tally(stream.content)
            delay = time.monotonic() - voted
            assert tally["total_ballots"] == 1
            assert [o["votes"] for o in tally["options"]] == [0, 1]
            print(
                f"\nSSE through nginx: the vote's tally arrived {delay * 1000:.0f} ms after its 202"
            )


async def test_websocket_tallies_flow_through_nginx(cluster: Cluster, tmp_path: Path) -> None:
    async with behind_nginx(cluster, tmp_path, workers=1) as (nginx, _):
        poll = await create_poll(nginx, ["A", "B"])
        async with (
            client_from(nginx, "127.0.0.8") as session,
            session.ws_connect(f"{nginx.url}/api/polls/{poll['id']}/ws") as ws,
        ):
            first = await ws.receive_json(timeout=LIVE_TIMEOUT)
            assert first["total_ballots"] == 0
            status, answer, _ = await vote(session, nginx, ballot(poll, "ws-watcher", 0))
            assert status == 202, answer
            async with asyncio.timeout(LIVE_TIMEOUT):
                tally = first
                while tally["total_ballots"] < 1:
                    tally = await ws.receive_json()
            assert [o["votes"] for o in tally["options"]] == [1, 0]


# -- live streams per client ---------------------------------------------------

NGINX_TOO_MANY_STREAMS = "too many live streams from your address, close one first"
# Edges of their own would refuse first if they limited live streams per
# address below nginx (a setting newer than this test): out of the way here.
NO_EDGE_LIVE_LIMIT = {"VOTEFLOW_LIVE_MAX_PER_ADDRESS": "1000000"}


async def open_sse(
    session: aiohttp.ClientSession, nginx: Nginx, poll: dict[str, Any], **headers: str
) -> aiohttp.ClientResponse:
    """A live SSE stream through nginx, once its first tally has arrived (the
    edge holds it); a refused one as it was answered."""
    response = await session.get(
        f"{nginx.url}/api/polls/{poll['id']}/live",
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=None, sock_read=LIVE_TIMEOUT),
    )
    if response.status == 200:
        async with asyncio.timeout(LIVE_TIMEOUT):
            await next_sse_tally(response.content)
    return response


async def assert_refused_by_nginx(response: aiohttp.ClientResponse) -> None:
    assert response.status == 429, response.status
    assert orjson.loads(await response.read()) == {"error": NGINX_TOO_MANY_STREAMS}
    assert response.headers["Retry-After"] == "10"
    response.release()


async def test_nginx_allows_each_client_a_bounded_number_of_live_streams(
    cluster: Cluster, tmp_path: Path
) -> None:
    allowed = live_streams_per_client()
    env = NO_EDGE_LIVE_LIMIT | {"VOTEFLOW_SSE_HEARTBEAT": "1"}
    async with behind_nginx(cluster, tmp_path, workers=0, **env) as (nginx, _):
        poll = await create_poll(nginx, ["A", "B"])
        streams: list[aiohttp.ClientResponse] = []
        try:
            async with (
                client_from(nginx, "127.0.0.12", limit=allowed + 10) as watcher,
                client_from(nginx, "127.0.0.13") as neighbour,
            ):
                streams = list(
                    await asyncio.gather(*(open_sse(watcher, nginx, poll) for _ in range(allowed)))
                )
                assert [s.status for s in streams] == [200] * allowed
                # One more, SSE or WebSocket, from the same address: nginx's 429.
                await assert_refused_by_nginx(await open_sse(watcher, nginx, poll))
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await watcher.ws_connect(f"{nginx.url}/api/polls/{poll['id']}/ws")
                assert refused.value.status == 429
                # Another address is not held back.
                other = await open_sse(neighbour, nginx, poll)
                assert other.status == 200
                other.close()
                # A stream that closes makes room for the next.
                streams.pop().close()

                async def reopened() -> bool:
                    stream = await open_sse(watcher, nginx, poll)
                    if stream.status == 200:
                        streams.append(stream)
                        return True
                    stream.release()
                    return False

                # nginx notices a closed stream when it next writes to it: at
                # the edge's next heartbeat (VOTEFLOW_SSE_HEARTBEAT, 1 s here).
                await until(reopened, timeout=10, what="a closed stream's slot is free again")
                await assert_refused_by_nginx(await open_sse(watcher, nginx, poll))
        finally:
            for stream in streams:
                stream.close()
    print(f"\nnginx: {allowed} live streams from one address, the next refused 429")


async def test_nginx_counts_the_live_streams_of_one_ipv6_64_together(
    cluster: Cluster, tmp_path: Path
) -> None:
    allowed = live_streams_per_client()
    async with behind_nginx(
        cluster, tmp_path, workers=0, real_ip_from="127.0.0.0/8", **NO_EDGE_LIVE_LIMIT
    ) as (nginx, _):
        poll = await create_poll(nginx, ["A", "B"])
        streams: list[aiohttp.ClientResponse] = []
        try:
            async with client_from(nginx, "127.0.0.14", limit=allowed + 10) as session:
                # Every stream from another address of the same /64.
                one_64 = [f"2001:db8:5:1::{n + 1:x}" for n in range(allowed)]
                streams = list(
                    await asyncio.gather(*(
                        open_sse(session, nginx, poll, **{"X-Forwarded-For": address})
                        for address in one_64
                    ))
                )  # fmt: skip
                assert [s.status for s in streams] == [200] * allowed
                rotated = {"X-Forwarded-For": "2001:db8:5:1:ffff::1"}
                await assert_refused_by_nginx(await open_sse(session, nginx, poll, **rotated))
                other_64 = await open_sse(
                    session, nginx, poll, **{"X-Forwarded-For": "2001:db8:5:2::1"}
                )
                assert other_64.status == 200
                other_64.close()
        finally:
            for stream in streams:
                stream.close()
