"""Routing logic shared by the sync and async topologies: slots, the slot map, grouping, redirects.

Nothing here does I/O, so the same decisions are made whichever client sends the bytes.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from ..conf import ConnectionSettings, NodeAddress
from ..forksafe import renew_locks_after_fork
from .breaker import Breakers

SLOT_COUNT = 16384
MAX_REDIRECTS = 5

# Errors that mean "the node could not do it right now": the failure policy may turn them into a miss or
# a dropped write. That includes a full node (OOM under noeviction) and a write that reached a replica
# mid-failover (READONLY). Every other ResponseError is a bug (wrong type, bad script, CROSSSLOT) and always
# reaches the caller.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    OutOfMemoryError,
    ReadOnlyError,
    ConnectionError,
    TimeoutError,
)
REDIRECT_ERRORS = (AskError, MovedError)  # MovedError subclasses AskError
TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (RedisTimeoutError, TimeoutError)
# The errors that say a node itself is unreachable or hung (not that it answered "no"): they count
# towards its circuit breaker (breaker.py).
BREAKER_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
)


def is_outage(error: BaseException) -> bool:
    return isinstance(error, OUTAGE_ERRORS) and not isinstance(error, REDIRECT_ERRORS)


class NotAClusterError(Exception):
    """A LOCATION node answered, but it is not a Redis Cluster node (cluster support disabled)."""


class NoNodeReachableError(RedisConnectionError):
    """None of the startup nodes (nor any known node) answered CLUSTER SLOTS."""


@dataclass(slots=True)
class Call:
    """One command for the node owning `key`. `read` calls may be served by a replica when allowed."""

    key: bytes
    args: tuple
    read: bool = False
    # When set, the call goes to this node with ASKING first (a slot in migration); topology-internal.
    asking: NodeAddress | None = None
    # False for commands that must not run twice (INCRBY, RPUSH): never re-sent after a lost reply.
    idempotent: bool = True


class SlotMap:
    """Which node serves each of the 16384 slots; replaced whole on refresh, patched on MOVED."""

    def __init__(self, ranges: list[tuple[int, int, NodeAddress, list[NodeAddress]]]) -> None:
        self.primaries: list[NodeAddress | None] = [None] * SLOT_COUNT
        self.replicas: list[tuple[NodeAddress, ...]] = [()] * SLOT_COUNT
        for start, end, primary, replicas in ranges:
            for slot in range(start, end + 1):
                self.primaries[slot] = primary
                self.replicas[slot] = tuple(replicas)
        self.primary_nodes: list[NodeAddress] = list(dict.fromkeys(p for p in self.primaries if p))
        self.replica_nodes: list[NodeAddress] = list(
            dict.fromkeys(r for _, _, _, replicas in ranges for r in replicas)
        )
        self._round_robin = itertools.count()

    @classmethod
    def from_cluster_slots(cls, reply: list, queried: NodeAddress) -> SlotMap:
        """Build from a CLUSTER SLOTS reply; an empty host means 'the node you asked'."""

        def address(entry: list) -> NodeAddress:
            host = entry[0].decode() if isinstance(entry[0], bytes) else entry[0]
            if not host or host == "?":
                host = queried.host
            return NodeAddress(host, int(entry[1]))

        ranges = [
            (int(item[0]), int(item[1]), address(item[2]), [address(r) for r in item[3:]]) for item in reply
        ]
        return cls(ranges)

    @property
    def covered(self) -> int:
        return sum(1 for p in self.primaries if p is not None)

    def node_for(self, key: bytes, read: bool = False, use_replicas: bool = False) -> NodeAddress | None:
        slot = key_slot(key)
        if read and use_replicas:
            replicas = self.replicas[slot]
            if replicas:
                return replicas[next(self._round_robin) % len(replicas)]
        return self.primaries[slot]

    def patch(self, slot: int, node: NodeAddress) -> None:
        """Apply a MOVED redirect to one slot at once; a full refresh follows in its own time."""
        self.primaries[slot] = node
        self.replicas[slot] = ()
        if node not in self.primary_nodes:
            self.primary_nodes.append(node)


@dataclass
class TopologyState:
    """Shared by a cache's sync and async topologies, so a redirect seen by one is known to the other."""

    settings: ConnectionSettings
    slot_map: SlotMap | None = None
    last_refresh: float = 0.0
    refresh_wanted: bool = False
    refreshing: bool = False  # a background refresh is running
    lock: threading.Lock = field(default_factory=threading.Lock)
    breakers: Breakers = field(init=False)

    def __post_init__(self) -> None:
        renew_locks_after_fork(self, "lock")
        self.breakers = Breakers(self.settings.breaker_threshold, self.settings.breaker_cooldown)

    def nodes_to_ask(self) -> list[NodeAddress]:
        """Nodes to ask for the slot map: those whose breaker is closed first."""
        nodes = self.known_nodes()
        return sorted(nodes, key=lambda node: self.breakers(node).state != "closed")

    def known_nodes(self) -> list[NodeAddress]:
        nodes = list(self.settings.startup_nodes)
        if self.slot_map is not None:
            nodes = self.slot_map.primary_nodes + self.slot_map.replica_nodes + nodes
        return list(dict.fromkeys(nodes))

    def refresh_due(self) -> bool:
        return time.monotonic() - self.last_refresh >= self.settings.topology_refresh_interval

    def install(self, slot_map: SlotMap) -> None:
        self.slot_map = slot_map
        self.last_refresh = time.monotonic()
        self.refresh_wanted = False

    def redirect(self, error: AskError, call: Call) -> Call:
        """The call to send after a MOVED/ASK reply."""
        target = NodeAddress(error.host, int(error.port))
        if isinstance(error, MovedError):
            if self.slot_map is not None:
                self.slot_map.patch(error.slot_id, target)
            self.refresh_wanted = True
            return Call(call.key, call.args, False, idempotent=call.idempotent)
        return Call(call.key, call.args, False, asking=target, idempotent=call.idempotent)


def group_by_node(calls: list[Call], route: Any) -> dict[NodeAddress | None, list[int]]:
    """Indexes of `calls` per target node, in call order."""
    groups: dict[NodeAddress | None, list[int]] = {}
    for index, call in enumerate(calls):
        groups.setdefault(route(call), []).append(index)
    return groups


def connection_kwargs(settings: ConnectionSettings, node: NodeAddress) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "host": node.host,
        "port": node.port,
        "username": settings.username,
        "password": settings.password,
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.socket_connect_timeout,
        "socket_keepalive": True,
    }
    if settings.ssl:
        kwargs.update(settings.ssl_options)
    return kwargs
