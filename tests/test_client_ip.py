"""Per-IP limits count the real client: X-Forwarded-For only from trusted proxies."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

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
