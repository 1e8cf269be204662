"""Per-IP limits count the real client: X-Forwarded-For only from trusted
proxies, and an IPv6 client by its network (VOTEFLOW_RATE_LIMIT_IPV6_PREFIX)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ingest.app import create_app
from tests.support import ballot, create_poll, edge_client
from voteflow.settings import Settings, SettingsError


async def statuses(settings: Settings, forwarded_for: list[str | None]) -> list[int]:
    """One vote per entry (distinct voters), each with that X-Forwarded-For."""
    async with edge_client(settings) as client:
        poll = await create_poll(client)
        answers = []
        for i, header in enumerate(forwarded_for):
            headers = {} if header is None else {"X-Forwarded-For": header}
            response = await client.post("/api/vote", json=ballot(poll, f"v{i}"), headers=headers)
            answers.append(response.status)
        return answers


def limited(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, rate_limit_per_ip=2, rate_limit_per_voter=0, **changes)


async def test_forged_header_from_an_untrusted_peer_is_ignored(settings: Settings) -> None:
    forged = ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
    assert await statuses(limited(settings), forged) == [202, 202, 429]


async def test_header_from_a_trusted_proxy_names_the_client(settings: Settings) -> None:
    proxied = limited(settings, trusted_proxies="127.0.0.1")
    clients = ["203.0.113.1", "203.0.113.1", "203.0.113.2", "203.0.113.1"]
    assert await statuses(proxied, clients) == [202, 202, 202, 429]


async def test_chain_of_trusted_proxies_is_skipped_from_the_right(settings: Settings) -> None:
    proxied = limited(settings, trusted_proxies="127.0.0.1, 10.0.0.0/8")
    chains = [
        "198.51.100.7, 10.0.0.5",
        "198.51.100.7, 10.1.2.3",
        # The client cannot pose as another by putting an address on the left.
        "192.0.2.99, 198.51.100.7, 10.0.0.5",
        "198.51.100.8, 10.0.0.5",
    ]
    assert await statuses(proxied, chains) == [202, 202, 429, 202]


def test_bad_trusted_proxies_stop_the_start_with_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="VOTEFLOW_TRUSTED_PROXIES"):
        Settings.from_env({"VOTEFLOW_TRUSTED_PROXIES": "10.0.0.0/8, nonsense"})


# -- IPv6: one subscriber holds a whole network ------------------------------


async def test_twenty_addresses_of_one_ipv6_64_share_one_allowance(settings: Settings) -> None:
    proxied = replace(
        settings, rate_limit_per_ip=5, rate_limit_per_voter=0, trusted_proxies="127.0.0.1"
    )
    one_64 = [f"2001:db8:aa:bb:{n:x}:{n * 7:x}::{n + 1:x}" for n in range(20)]
    answers = await statuses(proxied, one_64)
    assert answers.count(202) == 5, answers
    assert answers == [202] * 5 + [429] * 15


async def test_addresses_in_different_ipv6_64s_each_have_their_own_allowance(
    settings: Settings,
) -> None:
    proxied = limited(settings, trusted_proxies="127.0.0.1")
    # Neighbouring /64s of one /48: two votes each pass, the third is refused.
    clients = [f"2001:db8:aa:{n:x}::1" for n in range(10)] * 2 + ["2001:db8:aa:0::2"]
    assert await statuses(proxied, clients) == [202] * 20 + [429]


async def test_ipv6_prefix_setting_of_56_makes_the_whole_56_share_one_allowance(
    settings: Settings,
) -> None:
    proxied = limited(settings, trusted_proxies="127.0.0.1", rate_limit_ipv6_prefix=56)
    clients = [
        "2001:db8:aa:bb00::1",  # three /64s of one /56 (2001:db8:aa:bb00::/56)
        "2001:db8:aa:bb01::1",
        "2001:db8:aa:bbff:1:2:3:4",
        "2001:db8:aa:bc00::1",  # the next /56
    ]
    assert await statuses(proxied, clients) == [202, 202, 429, 202]


async def test_ipv4_mapped_ipv6_address_counts_as_its_ipv4_address(settings: Settings) -> None:
    # A mapped proxy address is a trusted proxy too (10.0.0.0/8 listed).
    proxied = limited(settings, trusted_proxies="127.0.0.1, 10.0.0.0/8")
    clients = ["203.0.113.5", "::ffff:203.0.113.5", "::ffff:203.0.113.5, ::ffff:10.0.0.9"]
    assert await statuses(proxied, clients) == [202, 202, 429]


async def test_a_direct_ipv6_peer_on_loopback_is_limited_by_its_64(settings: Settings) -> None:
    # The edge listens on ::1 and no proxy is trusted: the peer's own address
    # (::1, in ::/64) counts, and a forged header is still ignored.
    app = create_app(limited(settings))
    async with TestClient(TestServer(app, host="::1")) as client:
        poll = await create_poll(client)
        answers = []
        for n in range(3):
            headers = {"X-Forwarded-For": f"2001:db8:ff:{n}::1"}
            response = await client.post("/api/vote", json=ballot(poll, f"v{n}"), headers=headers)
            answers.append(response.status)
    assert answers == [202, 202, 429]


@pytest.mark.parametrize("prefix", ["0", "129", "-64"])
def test_ipv6_prefix_outside_1_to_128_stops_the_start_naming_the_variable(prefix: str) -> None:
    with pytest.raises(SettingsError, match="VOTEFLOW_RATE_LIMIT_IPV6_PREFIX"):
        Settings.from_env({"VOTEFLOW_RATE_LIMIT_IPV6_PREFIX": prefix})
