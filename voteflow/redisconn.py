"""voteflow's Redis clients: one server, or a Redis Cluster named by one node.

`open_redis` gives the client every process uses for its ordinary commands:
redis-py's `Redis`, or its `RedisCluster` when VOTEFLOW_REDIS_CLUSTER is set,
which finds the other nodes and follows MOVED replies and failovers itself.

The edge's appends need more than that: a pipeline per node and per tick
(redis-py's cluster pipeline would send it, but not WAIT on the same
connection after it). `Nodes` maps a key to a plain client of the master that
holds the key's slot, so that a pipeline and its WAIT go to that master on one
connection; on one server every key maps to the one client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from redis.asyncio import BlockingConnectionPool, Connection, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError, ResponseError

from voteflow.outages import REDIS_DOWN
from voteflow.settings import Settings

log = logging.getLogger(__name__)

AnyRedis: TypeAlias = Redis | RedisCluster
# Fewest seconds between two reads of a cluster's slot map after errors.
REFRESH_EVERY = 0.5


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A script of ours, called by its sha (EVALSHA) in pipelines; loaded on
    every master at start-up and again on NOSCRIPT (a restart, a failover)."""

    source: str
    sha: str

    @classmethod
    def read(cls, path: Path) -> LuaScript:
        source = path.read_text()
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


class ClusterClient(RedisCluster):
    """redis-py's cluster client, but one that never forgets a node it has seen.

    On a connection error redis-py drops the node from the nodes it asks for
    the slot map and closes every connection; during a failover the commands
    in flight on healthy nodes then fail too and drop their nodes, until no
    node is left to ask ("provide at least one reachable node") and the
    client stays broken. This one asks every node it has ever seen.

    And one that renews its nodes when one has no connection left: redis-py
    5's cluster node keeps a connection it failed to write on (a connect
    refused by a master that just died, say) counted as in use for good
    (redis-py issue 4110, fixed in releases that arq does not allow yet).
    After enough of them, every command to that node raises
    MaxConnectionsError, which, unlike a connection error, makes redis-py
    keep its nodes and its stale slot map: a worker stayed stuck after a
    failover until restarted. On MaxConnectionsError this client drops its
    nodes, connections and slot map (as redis-py does on a connection
    error), and the next command starts again from new ones.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except MaxConnectionsError:
            manager = self.nodes_manager
            # New node objects to ask for the slot map: the old ones may be
            # the nodes that have no connection left.
            manager.startup_nodes = {
                name: ClusterNode(host, port, **manager.connection_kwargs)
                for name, (host, port) in self.__dict__.get("_seen", {}).items()
            } or manager.startup_nodes
            await self.aclose()
            raise

    async def initialize(self) -> ClusterClient:
        self._reseed()
        await super().initialize()
        self._remember()
        return self

    async def refresh(self) -> None:
        """Read the slot map again (after a failover, moved slots)."""
        self._reseed()
        await self.nodes_manager.initialize()
        self._remember()

    def _remember(self) -> None:
        seen: dict[str, tuple[str, int]] = self.__dict__.setdefault("_seen", {})
        for node in self.nodes_manager.nodes_cache.values():
            seen[node.name] = (node.host, int(node.port))

    def _reseed(self) -> None:
        manager = self.nodes_manager
        for name, (host, port) in self.__dict__.get("_seen", {}).items():
            if name not in manager.startup_nodes:
                manager.startup_nodes[name] = ClusterNode(host, port, **manager.connection_kwargs)


def open_redis(
    settings: Settings, *, max_connections: int, blocking: bool = False, **options: Any
) -> AnyRedis:
    """The client for ordinary commands; `max_connections` is per node.
    `blocking`: on one server, wait for a free connection (see blocking_client)."""
    client: AnyRedis
    if settings.redis_cluster:
        client = ClusterClient.from_url(
            settings.redis_url, max_connections=max_connections, **options
        )
    elif blocking:
        client = blocking_client(settings.redis_url, max_connections)
    else:
        client = Redis.from_url(settings.redis_url, max_connections=max_connections, **options)
    return client


def blocking_client(url: str, max_connections: int) -> Redis:
    """A client that, at a spike, waits a moment for a free connection instead
    of failing (redis-py's plain pool raises when it runs out)."""
    return Redis(
        connection_pool=BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=5, socket_timeout=5,
            socket_connect_timeout=2, health_check_interval=15,
        )
    )  # fmt: skip


async def _masters_info(client: AnyRedis, section: str) -> list[dict[str, Any]]:
    if isinstance(client, RedisCluster):
        return [await client.info(section, target_nodes=n) for n in client.get_primaries()]
    return [await client.info(section)]


async def server_version(client: AnyRedis) -> tuple[int, ...]:
    """The lowest server version among the client's masters."""
    infos = await _masters_info(client, "server")
    return min(tuple(int(p) for p in str(info["redis_version"]).split(".")) for info in infos)


async def has_sharded_pubsub(client: AnyRedis) -> bool:
    """Whether every master has SPUBLISH/SSUBSCRIBE (Redis 7.0)."""
    return await server_version(client) >= (7, 0)


async def has_waitaof(client: AnyRedis) -> bool:
    """Whether to confirm appends with WAITAOF rather than WAIT: every master
    has it (Redis 7.2) and keeps an append-only file, as its replicas then do
    too (WAITAOF would otherwise never see a replica's fsync and time out)."""
    if await server_version(client) < (7, 2):
        return False
    return all(
        int(info.get("aof_enabled", 0)) for info in await _masters_info(client, "persistence")
    )


class Nodes:
    """A plain client per master, found by key; one client on one server."""

    def __init__(self, client: AnyRedis, max_connections: int) -> None:
        self._client = client
        self._max_connections = max_connections
        self._single = client if isinstance(client, Redis) else None
        self._clients: dict[str, Redis] = {}
        self._refreshed = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if isinstance(self._client, RedisCluster):
            # Reads the slot map; raises if no node named in the URL answers.
            await self._client.initialize()

    def for_key(self, key: str) -> tuple[str, Redis]:
        """The name of the master holding `key`, and a client of it."""
        if self._single is not None:
            return "redis", self._single
        assert isinstance(self._client, RedisCluster)
        node = self._client.get_node_from_key(key)
        if node is None:  # pragma: no cover - only replicas are ever None
            raise RedisError(f"no master holds {key!r}")
        client = self._clients.get(node.name)
        if client is None:
            client = self._clients[node.name] = blocking_client(
                f"redis://{node.host}:{node.port}/0", self._max_connections
            )
        return node.name, client

    async def script_load(self, source: str) -> None:
        """Load a script on every master."""
        await self._client.script_load(source)

    def pipeline(self) -> RoutedPipeline:
        return RoutedPipeline(self)

    def clients(self) -> list[Redis]:
        if self._single is not None:
            return [self._single]
        return list(self._clients.values())

    def refresh_soon(self) -> None:
        """Read the slot map again (at most every REFRESH_EVERY seconds), after
        an error that may mean a failover or moved slots."""
        if not isinstance(self._client, RedisCluster):
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        if time.monotonic() - self._refreshed < REFRESH_EVERY:
            return
        self._refreshed = time.monotonic()
        self._refreshing = asyncio.create_task(self._refresh(self._client), name="slot-map")

    async def _refresh(self, cluster: RedisCluster) -> None:
        try:
            if isinstance(cluster, ClusterClient):
                await cluster.refresh()
            else:
                await cluster.nodes_manager.initialize()
        except Exception as exc:  # whatever it was, the next error asks again
            log.warning("reading the cluster's slot map failed: %s", exc)
            return
        masters = {node.name for node in cluster.get_primaries()}
        for name in [name for name in self._clients if name not in masters]:
            gone = self._clients.pop(name)
            with contextlib.suppress(RedisError, OSError):
                await gone.aclose()

    async def close(self) -> None:
        """Close the per-master clients (the client given is the caller's)."""
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refreshing
        for client in self._clients.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()


class SlotOwner:
    """Finds the master that holds one key's slot now, for a client that is not
    cluster-aware (arq): it connects to that master, and again after a failover."""

    def __init__(self, url: str, key: str) -> None:
        self._url = url
        self._key = key
        self._cluster: ClusterClient | None = None

    async def locate(self) -> tuple[str, int]:
        if self._cluster is None:
            # Kept: after its first read of the slot map it knows every node,
            # so a later search does not depend on the node the URL names.
            self._cluster = ClusterClient.from_url(self._url, socket_connect_timeout=2)
            await self._cluster.initialize()
        else:
            await self._cluster.refresh()
        node = self._cluster.get_node_from_key(self._key)
        if node is None:  # pragma: no cover - only replicas are ever None
            raise RedisError(f"no master holds {self._key!r}")
        return node.host, int(node.port)

    async def close(self) -> None:
        if self._cluster is not None:
            await self._cluster.aclose()


class SlotOwnerConnection(Connection):
    """A connection to the master a SlotOwner names, looked up at each connect.

    MOVED (the slot went elsewhere) and READONLY (this node was demoted to a
    replica) end the connection as a connection error would, so that the
    client's retry connects again, to the new owner.
    """

    def __init__(self, *, slot_owner: SlotOwner, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slot_owner = slot_owner

    async def _connect(self) -> None:
        # Each attempt asks again: during a failover the first answer may
        # still name the master that died.
        try:
            self.host, self.port = await self._slot_owner.locate()
        except Exception as exc:
            raise RedisConnectionError(f"no master found for arq's keys: {exc}") from exc
        await super()._connect()  # type: ignore[no-untyped-call]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if str(exc).startswith(("MOVED", "READONLY", "You can't write against a read only")):
                await self.disconnect(nowait=True)
                raise RedisConnectionError(f"{self.host}:{self.port} {exc}") from exc
            raise


class RoutedPipeline:
    """Commands for many keys sent as one pipeline per master, the masters at
    the same time; replies come back in the order the commands were added.

    (redis-py's cluster pipeline refuses EVALSHA, which voteflow's scripts need.)
    """

    def __init__(self, nodes: Nodes) -> None:
        self._nodes = nodes
        self._pipes: dict[str, Any] = {}
        self._order: list[tuple[str, int]] = []

    def for_key(self, key: str) -> Any:
        """The pipeline to add the next command on `key` to (exactly one)."""
        name, client = self._nodes.for_key(key)
        pipe = self._pipes.get(name)
        if pipe is None:
            pipe = self._pipes[name] = client.pipeline(transaction=False)
        self._order.append((name, len(pipe.command_stack)))
        return pipe

    async def execute(self) -> list[Any]:
        """A reply per command, an exception for a command that failed; raises
        when a master could not be reached."""
        names = list(self._pipes)
        try:
            answers = await asyncio.gather(
                *(self._pipes[name].execute(raise_on_error=False) for name in names)
            )
        except REDIS_DOWN:
            self._nodes.refresh_soon()
            raise
        by_master = dict(zip(names, answers, strict=True))
        return [by_master[name][i] for name, i in self._order]
