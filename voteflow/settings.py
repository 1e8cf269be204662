"""voteflow's settings: every ``VOTEFLOW_*`` environment variable, read once.

Both the edge and the workers build a :class:`Settings` at start-up with
:func:`Settings.from_env` and pass it down; nothing else reads the environment.
A bad value stops the process at start-up with a message naming the variable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .stack import Stack

PREFIX = "VOTEFLOW_"
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# An admin token shorter than this, or one of these placeholders from examples
# and templates (compared case-insensitively), stops the start: whoever reads
# the example or guesses can create and close polls.
MIN_ADMIN_TOKEN = 24
PLACEHOLDER_TOKENS = frozenset({"secret", "admin", "password", "token", "test", "xxx"})
PLACEHOLDER_MARKS = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "your-token")
# An origin as a browser sends it: scheme, host, and a port only when it is not
# the scheme's default (RFC 6454); no path, no trailing slash.
_ORIGIN = re.compile(r"https?://[a-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9a-f:.]+\](:[0-9]{1,5})?")
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


# Where workers on one host serve /metrics when VOTEFLOW_WORKER_METRICS_PORT is
# unset: each takes the first free port, so Prometheus scrapes this range.
WORKER_METRICS_PORTS = range(9464, 9480)


class SettingsError(ValueError):
    """A ``VOTEFLOW_*`` variable has a value voteflow cannot use."""


def normal_origin(origin: str) -> str:
    """``HTTPS://App.Example.com:443`` -> ``https://app.example.com``: how a
    browser spells an origin in its ``Origin`` header, and how voteflow compares them."""
    origin = origin.strip().lower()
    scheme = origin.partition("://")[0]
    default = _DEFAULT_PORTS.get(scheme)
    if default and origin.endswith(default):
        origin = origin[: -len(default)]
    return origin


def parse_origins(spec: str) -> frozenset[str]:
    """``"https://a.example, http://localhost:3000"`` -> normalised origins;
    raises ValueError naming one that is not an origin."""
    origins = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        origin = normal_origin(item)
        if _ORIGIN.fullmatch(origin) is None:
            raise ValueError(
                f"{item!r} is not an origin (scheme://host[:port], no path, like "
                "https://app.example.com)"
            )
        origins.add(origin)
    return frozenset(origins)


@dataclass(frozen=True, slots=True)
class Settings:
    # Empty means "none configured": `voteflow up` then starts private servers.
    database_url: str = ""
    redis_url: str = ""
    # Where reads that need not be fresh (the poll list) go, a streaming
    # replica say; empty: the primary, database_url.
    database_read_url: str = ""
    # Prepared statements asyncpg keeps per connection. 0 when PgBouncer pools
    # by transaction (a statement prepared on one server connection is not
    # there on the next).
    database_statement_cache_size: int = 100
    # The database is Citus (docs/scaling.md): workers write a batch with one
    # cast_poll_votes call per poll, which Citus runs on the node holding it.
    database_citus: bool = False
    # redis_url names one node of a Redis Cluster; the edges and workers find
    # the rest, and follow failovers by themselves.
    redis_cluster: bool = False
    # Replicas that must hold a vote before the edge answers 202 (WAIT, or
    # WAITAOF where the server has it). 0: the master's own append suffices.
    redis_min_replicas: int = 0
    host: str = "127.0.0.1"
    port: int = 8080
    # Empty disables the admin routes (poll creation and closing answer 401).
    # Set, it must be at least MIN_ADMIN_TOKEN characters and no placeholder.
    admin_token: str = ""
    # Comma-separated origins (https://app.example.com) whose pages may call the
    # API from a browser, besides the edge's own (see ingest.origins).
    allowed_origins: str = ""
    # The origin voters open (https://vote.example.com): share links and QR
    # codes point there. Empty: the origin the page itself was loaded from.
    public_url: str = ""
    # Voters proven by signed tokens (ingest.voters): a shared HS256 secret, or
    # the issuing app's public key (PEM, or the path of a file holding it;
    # RS256, ES256 or EdDSA by its type). Empty: user_id is the client's word.
    voter_token_secret: str = dataclasses.field(default="", repr=False)
    voter_token_public_key: str = ""
    # When set, a token's iss / aud must be these.
    voter_token_issuer: str = ""
    voter_token_audience: str = ""
    # Requests per minute; 0 turns the limit off. A client may spend the whole
    # minute's allowance at once (burst), then refills evenly.
    rate_limit_per_ip: int = 600
    rate_limit_per_voter: int = 60
    # An IPv6 client counts against the per-IP limit by its network of this
    # many bits, not by its address: a subscriber gets a whole /64 (or /56,
    # /48) and can vote from any of its addresses. 128: per address.
    rate_limit_ipv6_prefix: int = 64
    # Comma-separated addresses or networks of the proxies in front of the
    # edges; only from these is X-Forwarded-For believed (see ingest.clientip).
    trusted_proxies: str = ""
    # Namespace of every Redis key voteflow uses (see voteflow.keys).
    key_prefix: str = "voteflow"
    # Seconds the edges remember a queued vote_id, so that a retry is answered
    # 202 without being queued again (164 bytes of Redis per vote: README,
    # "Redis memory").
    idempotency_window: int = 3600
    stream_shards: int = 8
    # Entries a stream shard may hold (not yet written by the workers) before
    # the edges answer its votes 503: the spike is queued, but Redis memory
    # stays bounded (405 bytes per queued vote: README, "Redis memory"). 0: no limit.
    max_backlog: int = 100_000
    batch_size: int = 500
    # Milliseconds a stream consumer waits after a batch smaller than
    # batch_size before it reads again, so that the next batch gathers more
    # votes: one cast_vote_atomic call for many costs PostgreSQL far less per
    # vote than many calls for few. It delays a vote's commit by as much at
    # most, and never while a backlog fills whole batches. 0: read at once.
    batch_linger_ms: int = 50
    # Stream consumers per worker process: each reads a batch and commits it
    # with one cast_vote_atomic call, so this is also the PostgreSQL pool size.
    consumers: int = 4
    # A pending message idle this long belongs to a dead consumer and is claimed.
    claim_idle_ms: int = 30_000
    # Workers that may die holding a message before it goes to the dead letters
    # (a PostgreSQL outage never counts a delivery; see workers.reclaim).
    max_deliveries: int = 5
    # Seconds an edge trusts its cached copy of a poll (closing invalidates it at once).
    poll_cache_ttl: float = 5.0
    vote_partitions: int = 16
    # A worker's /metrics port. Unset: the first free one of
    # WORKER_METRICS_PORTS (9464 for a host's first worker, 9465 for its
    # second...), named in the worker's first log line. Set: that port only,
    # and a taken one stops the worker at start; 0: any free port.
    worker_metrics_port: int | None = None
    # The address a worker's /metrics listens on: loopback unless a Prometheus
    # in another container or pod must reach it (0.0.0.0 or the pod's address).
    worker_metrics_host: str = "127.0.0.1"
    # Seconds between SSE heartbeats (WebSocket pings), so proxies keep idle
    # streams open.
    sse_heartbeat: float = 15.0
    # Live updates one client gets per second at most, per poll; the last one
    # is always the latest tally.
    live_updates_per_second: float = 4.0
    # Seconds a live client may leave one update unread before it is dropped
    # (its socket buffer is full): the edge never queues for it.
    live_write_timeout: float = 10.0
    # Live streams (SSE and WebSocket) one client address may hold open at once
    # per edge process, counted as the per-IP limit counts it (an IPv6 /64).
    # A room's phones often share one NAT address: as nginx's limit_conn (100),
    # far below the live budget, so that one address can never take it all.
    live_max_per_address: int = 100
    # Seconds a live stream lasts at most; then the edge ends it and the client
    # reconnects, resuming from the latest tally.
    live_max_seconds: float = 3600.0
    # Connections per edge process live streams may take in all, so that
    # watchers never take the ones voters need; 0: half of max_connections.
    live_max_connections: int = 0
    # Slow or stuck clients: most open connections per edge process, and the
    # seconds a client has to send its request headers, then its body.
    max_connections: int = 10_000
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    # Seconds an idle keep-alive connection stays open.
    keepalive_timeout: float = 75.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in fields(cls):
            name = PREFIX + field.name.upper()
            if name not in env:
                continue
            raw = env[name].strip()
            if field.type in ("int", "int | None"):
                try:
                    values[field.name] = int(raw)
                except ValueError:
                    raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
            elif field.type == "bool":
                if raw.lower() not in BOOLEANS:
                    raise SettingsError(f"{name} must be true or false, got {raw!r}")
                values[field.name] = BOOLEANS[raw.lower()]
            elif field.type == "float":
                try:
                    values[field.name] = float(raw)
                except ValueError:
                    raise SettingsError(f"{name} must be a number, got {raw!r}") from None
            else:
                values[field.name] = raw
        values.update(overrides)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise SettingsError(f"{PREFIX}{name.upper()} {rule}, got {value!r}")

        need(0 < self.port < 65536, "port", "must be a TCP port")
        need(
            0 <= self.database_statement_cache_size <= 10_000,
            "database_statement_cache_size",
            "must be between 0 and 10000",
        )
        need(0 <= self.redis_min_replicas <= 16, "redis_min_replicas", "must be between 0 and 16")
        need(self.rate_limit_per_ip >= 0, "rate_limit_per_ip", "must be >= 0")
        need(self.rate_limit_per_voter >= 0, "rate_limit_per_voter", "must be >= 0")
        need(
            1 <= self.rate_limit_ipv6_prefix <= 128,
            "rate_limit_ipv6_prefix",
            "must be a prefix length between 1 and 128",
        )
        try:
            for part in filter(None, (p.strip() for p in self.trusted_proxies.split(","))):
                ipaddress.ip_network(part, strict=False)
        except ValueError:
            need(False, "trusted_proxies", "must list IP addresses or networks, comma-separated")
        if self.admin_token:
            # The value itself is never echoed: it is a secret, even a weak one.
            lowered = self.admin_token.lower()
            if lowered in PLACEHOLDER_TOKENS or any(m in lowered for m in PLACEHOLDER_MARKS):
                raise SettingsError(
                    f"{PREFIX}ADMIN_TOKEN is a placeholder from an example: set a random one "
                    "(python -c 'import secrets; print(secrets.token_urlsafe(32))'), or leave "
                    "it empty to disable the admin routes"
                )
            if len(self.admin_token) < MIN_ADMIN_TOKEN:
                raise SettingsError(
                    f"{PREFIX}ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN} characters, got "
                    f"{len(self.admin_token)} (python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))' makes one), or empty to disable the "
                    "admin routes"
                )
            # A header is ASCII (RFC 9110); any other token could never match.
            if re.fullmatch(r"[!-~]+", self.admin_token) is None:
                raise SettingsError(f"{PREFIX}ADMIN_TOKEN must be printable ASCII without spaces")
        try:
            parse_origins(self.allowed_origins)
        except ValueError as exc:
            raise SettingsError(f"{PREFIX}ALLOWED_ORIGINS: {exc}") from None
        try:
            need(len(parse_origins(self.public_url)) <= 1, "public_url", "must be one origin")
        except ValueError as exc:
            raise SettingsError(f"{PREFIX}PUBLIC_URL: {exc}") from None
        need(self.idempotency_window >= 1, "idempotency_window", "must be >= 1")
        need(self.max_backlog >= 0, "max_backlog", "must be >= 0")
        need(1 <= self.stream_shards <= 1024, "stream_shards", "must be between 1 and 1024")
        need(1 <= self.batch_size <= 10_000, "batch_size", "must be between 1 and 10000")
        need(0 <= self.batch_linger_ms <= 1000, "batch_linger_ms", "must be between 0 and 1000")
        need(1 <= self.consumers <= 256, "consumers", "must be between 1 and 256")
        need(self.claim_idle_ms >= 1000, "claim_idle_ms", "must be >= 1000")
        need(self.max_deliveries >= 1, "max_deliveries", "must be >= 1")
        need(self.poll_cache_ttl >= 0, "poll_cache_ttl", "must be >= 0")
        need(1 <= self.vote_partitions <= 1024, "vote_partitions", "must be between 1 and 1024")
        need(
            self.worker_metrics_port is None or 0 <= self.worker_metrics_port < 65536,
            "worker_metrics_port",
            "must be a port or 0",
        )
        try:
            ipaddress.ip_address(self.worker_metrics_host)
        except ValueError:
            need(False, "worker_metrics_host", "must be an IP address (127.0.0.1, 0.0.0.0, ::)")
        need(self.sse_heartbeat > 0, "sse_heartbeat", "must be > 0")
        need(self.live_updates_per_second > 0, "live_updates_per_second", "must be > 0")
        need(self.live_write_timeout > 0, "live_write_timeout", "must be > 0")
        need(self.max_connections >= 1, "max_connections", "must be >= 1")
        need(self.live_max_per_address >= 1, "live_max_per_address", "must be >= 1")
        need(self.live_max_seconds > 0, "live_max_seconds", "must be > 0")
        need(
            0 <= self.live_max_connections < self.max_connections,
            "live_max_connections",
            f"must be 0 (half of VOTEFLOW_MAX_CONNECTIONS) or below VOTEFLOW_MAX_CONNECTIONS "
            f"({self.max_connections}), so that live streams leave connections for votes",
        )
        need(self.header_timeout > 0, "header_timeout", "must be > 0")
        need(self.body_timeout > 0, "body_timeout", "must be > 0")
        need(self.keepalive_timeout > 0, "keepalive_timeout", "must be > 0")
        need(
            re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", self.key_prefix) is not None,
            "key_prefix",
            "must be 1-64 characters of letters, digits and _.:-",
        )
        need(
            self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
            "log_level",
            "must be DEBUG, INFO, WARNING or ERROR",
        )

    @property
    def live_connections(self) -> int:
        """Live streams an edge process may hold open in all."""
        return self.live_max_connections or self.max_connections // 2

    @property
    def local_url(self) -> str:
        """The base URL of an edge listening where these settings say, from this machine."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def with_stack(self, stack: Stack | None) -> Settings:
        """These settings, with the URLs of the stack ``voteflow up`` runs for
        the ones not set: a command run beside ``up`` (``voteflow audit``)
        needs no ``VOTEFLOW_*_URL``. The Redis URL comes with the settings that
        name the keys in it."""
        if stack is None:
            return self
        settings = self
        if not settings.database_url:
            settings = dataclasses.replace(settings, database_url=stack.database_url)
        if not settings.redis_url:
            settings = dataclasses.replace(
                settings,
                redis_url=stack.redis_url,
                redis_cluster=stack.redis_cluster,
                key_prefix=stack.key_prefix,
                stream_shards=stack.stream_shards,
            )
        return settings

    def require_urls(self) -> None:
        """The edge and the workers cannot start without both servers."""
        for name in ("database_url", "redis_url"):
            if not getattr(self, name):
                raise SettingsError(
                    f"{PREFIX}{name.upper()} is not set (`voteflow up` starts private servers)"
                )
