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
    # Each field's docstring is its meaning in the settings table of
    # docs/operations.md (Markdown, links relative to docs/), which `make docs`
    # writes from here (voteflow/settingsdoc.py): one place for each setting.
    database_url: str = ""
    """PostgreSQL URL. Unset: `voteflow up` starts a private server."""
    redis_url: str = ""
    """Redis URL. Unset: `voteflow up` starts a private server."""
    database_read_url: str = ""
    """Where reads that need not be fresh (the poll list) go, a streaming
    replica say. Unset: the primary."""
    database_statement_cache_size: int = 100
    """Prepared statements asyncpg keeps per PostgreSQL connection; 0 behind
    PgBouncer in transaction pooling mode (a statement prepared on one server
    connection is not there on the next: [why](deploying.md#why-the-cache-must-be-0))."""
    database_citus: bool = False
    """`true`: the database is Citus; workers write each poll of a batch with
    its own `cast_poll_votes` call, which Citus runs on the node that holds
    the poll (see [scaling.md](scaling.md))."""
    redis_cluster: bool = False
    """`true`: `VOTEFLOW_REDIS_URL` names one node of a Redis Cluster; the
    edges and workers find the rest, and follow failovers by themselves."""
    redis_min_replicas: int = 0
    """Replicas that must hold a vote before it is answered 202 (WAIT, or
    WAITAOF where the server has it); 0: the master's own append suffices
    (see [On a Redis Cluster](guarantees.md#on-a-redis-cluster))."""
    host: str = "127.0.0.1"
    """Address the edge listens on."""
    port: int = 8080
    """Port the edge listens on."""
    admin_token: str = ""
    """Bearer token of the admin routes; empty: they are off (creating and
    closing polls answer 401). At least 24 printable ASCII characters
    (`MIN_ADMIN_TOKEN`), and no placeholder (`change-me`, `changeme`,
    `secret`, `admin`, ...): otherwise the process stops at start naming the
    variable. `voteflow up` generates one when unset."""
    allowed_origins: str = ""
    """Origins (comma-separated, like `https://app.example.com`) whose web
    pages may call the API from a browser, besides the edge's own (see
    [Browsers and other origins](api.md#browsers-and-other-origins);
    `ingest.origins`)."""
    public_url: str = ""
    """The origin voters open (like `https://vote.example.com`): share links
    and QR codes point there; without it, the origin the page was loaded
    from (behind a proxy listed in `VOTEFLOW_TRUSTED_PROXIES`, its
    `X-Forwarded-Proto` and `X-Forwarded-Host`)."""
    voter_token_secret: str = dataclasses.field(default="", repr=False)
    """HS256 secret shared with the app that issues voter tokens, 32 bytes at
    least; empty, and no public key: a `user_id` is the client's word (see
    [voter-tokens.md](voter-tokens.md); `ingest.voters`)."""
    voter_token_public_key: str = ""
    """Or: that app's public key (PEM, or a file's path): RS256, ES256 or
    EdDSA by its type."""
    voter_token_issuer: str = ""
    """When set, a voter token's `iss` must be this."""
    voter_token_audience: str = ""
    """When set, a voter token's `aud` must name this."""
    rate_limit_per_ip: int = 600
    """Votes per minute per client address (the whole minute may be spent at
    once, then it refills evenly), votes for poll ids that name no poll
    included; 0 turns it off."""
    rate_limit_per_voter: int = 60
    """Votes per minute per voter; 0 turns it off."""
    rate_limit_ipv6_prefix: int = 64
    """An IPv6 client counts against `VOTEFLOW_RATE_LIMIT_PER_IP` by its
    network of this many bits (its /64), since a subscriber can vote from any
    address of it; 1 to 128 (128: per address). An IPv4-mapped address
    (`::ffff:192.0.2.1`) counts as its IPv4 address."""
    trusted_proxies: str = ""
    """Addresses or networks (comma-separated) of proxies in front of the
    edges; only from these is `X-Forwarded-For` believed for per-IP limits
    (`ingest.clientip`). The Kubernetes base ships a placeholder that stops
    the start until it is set."""
    key_prefix: str = "voteflow"
    """Prefix of every Redis key (`voteflow.keys`)."""
    idempotency_window: int = 3600
    """Seconds the edges remember a queued `vote_id`, so that a retry is
    answered 202 without being queued again (its bytes of Redis per vote:
    [Redis memory](guarantees.md#redis-memory))."""
    stream_shards: int = 8
    """Stream shards; every edge and worker of a deployment must agree."""
    max_backlog: int = 100_000
    """Votes a shard may hold, not yet written, before its votes are answered
    503: the spike is queued, but Redis memory stays bounded (its bytes per
    queued vote: [Redis memory](guarantees.md#redis-memory)); 0: no limit."""
    batch_size: int = 500
    """Most votes a consumer commits in one `cast_vote_atomic` call."""
    batch_linger_ms: int = 50
    """After a batch smaller than `VOTEFLOW_BATCH_SIZE`, how long a consumer
    waits before reading again, so that the next batch gathers more votes:
    one call for many costs PostgreSQL far less per vote than many calls for
    few. It delays a vote's commit by as much at most: a vote on a quiet
    stream is read at once, a backlog without waiting; 0: read at once
    (measured: [Measured](benchmarks.md#measured))."""
    consumers: int = 4
    """Stream consumers per worker process, and so its PostgreSQL
    connections: each reads a batch and commits it with one call."""
    claim_idle_ms: int = 30_000
    """A message pending this long belongs to a dead consumer and is claimed."""
    max_deliveries: int = 5
    """Workers that may die holding a vote before it goes to the dead letters
    (a PostgreSQL outage never counts a delivery; `workers.reclaim`)."""
    poll_cache_ttl: float = 5.0
    """Seconds an edge trusts its cached copy of a poll (closing invalidates
    it at once), and remembers that an id names no poll (in a cache of their
    own, 10,000 ids, so that made-up ids evict no real poll)."""
    vote_partitions: int = 16
    """Hash partitions of the votes tables, applied by the first migration."""
    worker_metrics_port: int | None = None
    """A worker's `/metrics` port. Unset: the first free one of 9464-9479
    (`WORKER_METRICS_PORTS`: 9464 for a host's first worker, 9465 for its
    second...), named in the worker's first log line. Set: that port only, and
    a taken one stops the worker at start with one line naming this setting
    (exit status 2); 0: any free port (logged)."""
    worker_metrics_host: str = "127.0.0.1"
    """The IP address a worker's `/metrics` listens on; loopback keeps the
    counts off the network. Set `0.0.0.0` (as `infra/k8s` and
    `infra/compose` do) where Prometheus scrapes from another pod or
    container."""
    sse_heartbeat: float = 15.0
    """Seconds between SSE keep-alive comments (WebSocket pings), so proxies
    keep idle streams open."""
    live_updates_per_second: float = 4.0
    """Live updates a watcher gets per second at most, per poll; the last is
    always the latest tally."""
    live_write_timeout: float = 10.0
    """Seconds a live watcher may leave an update unread (its socket buffer
    full) before it is dropped: the edge never queues for it."""
    live_max_per_address: int = 100
    """Live streams (SSE and WebSocket) one client address (an IPv6 /64) may
    hold open per edge process; one more answers 429 (see [Live
    streams](api.md#live-streams)). A room's phones often share one NAT
    address: as nginx's `limit_conn` (100), far below the live budget."""
    live_max_seconds: float = 3600.0
    """Seconds a live stream lasts at most (up to a tenth less, at random);
    then the edge ends it and the client reconnects to the current tally."""
    live_max_connections: int = 0
    """Live streams per edge process in all, below
    `VOTEFLOW_MAX_CONNECTIONS`, so that watchers never take the connections
    voters need; one more answers 503. 0: half of `VOTEFLOW_MAX_CONNECTIONS`."""
    max_connections: int = 10_000
    """Open connections per edge process; one more is closed at once."""
    header_timeout: float = 10.0
    """Seconds a new connection has to send its first request head."""
    body_timeout: float = 10.0
    """Seconds a request has to send its body (408 after)."""
    keepalive_timeout: float = 75.0
    """Seconds an idle keep-alive connection stays open."""
    log_level: str = "INFO"
    """`DEBUG`, `INFO`, `WARNING` or `ERROR`."""

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
