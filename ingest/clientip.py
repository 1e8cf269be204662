"""The client address that per-IP rate limits count against.

``X-Forwarded-For`` is believed only when the direct peer is a trusted proxy
(``VOTEFLOW_TRUSTED_PROXIES``); from any other peer the header is ignored, so
a client cannot dodge its limit by forging it. Behind a chain of proxies, the
addresses are read from the right and trusted proxies skipped: the first one
that is not a trusted proxy is the client (what nginx's real_ip_recursive
does). aiohttp-remotes' XForwardedStrict was not used: it refuses requests
with the header from untrusted peers instead of ignoring it, and wants the
exact chain of proxies.

The limit then counts against :func:`limited_as`: an IPv4 address as it is,
an IPv6 address by its network (its /64 by default), since one subscriber
holds a whole /64 and can send from any address in it. An IPv4-mapped IPv6
address (``::ffff:192.0.2.1``, what a dual-stack socket reports for an IPv4
client) is the IPv4 address, for the limits and for the trusted proxies alike.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 127.0.0.1"`` -> networks; raises ValueError naming a bad one."""
    networks = []
    for item in (part.strip() for part in spec.split(",")):
        if item:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def _trusted(address: str, proxies: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in proxies)


def trusted_peer(request: web.Request, proxies: Sequence[Network]) -> bool:
    """The direct peer is one of the trusted proxies: its X-Forwarded-* hold."""
    return _trusted(request.remote or "", proxies)


def client_ip(request: web.Request, proxies: Sequence[Network]) -> str:
    peer = request.remote or "unknown"
    if not proxies or not _trusted(peer, proxies):
        return peer
    hops = _hops(request.headers.getall("X-Forwarded-For", ()))
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    # Every address is a trusted proxy: the leftmost is as far as we can see.
    return hops[0] if hops else peer


def _hops(values: Iterable[str]) -> list[str]:
    return [hop.strip() for value in values for hop in value.split(",") if hop.strip()]


# Distinct clients seen recently: a flood from one subscriber's /64 parses each
# address once, and the cache stays small however many addresses it rotates.
@functools.lru_cache(maxsize=4096)
def limited_as(address: str, ipv6_prefix: int) -> str:
    """What a per-address limit counts `address` as: an IPv4 address itself,
    an IPv6 address its network of `ipv6_prefix` bits (``2001:db8::/64``), an
    IPv4-mapped one its IPv4 address. Anything else (``unknown``) as it is."""
    if ":" not in address:
        return address  # IPv4, the common case: no parsing
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    # The scope (fe80::1%eth0) is left out: the network is the same.
    return ipaddress.IPv6Network((int(ip), ipv6_prefix), strict=False).compressed
