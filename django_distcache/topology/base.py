"""Routing logic shared by the sync and async topologies: slots, the slot map, grouping, redirects.

Nothing here does I/O, so the same decisions are made whichever client sends the bytes.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoPermissionError,
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
from .breaker import CLOSED, Breakers
from .repair import FailoverRepair

SLOT_COUNT = 16384
MAX_REDIRECTS = 5
# Calls a batch sends in one round: a larger batch goes in slices, one after the other, so that no write to
# a socket carries more than its timeout can cover and a million-key get_many works like a small one.
BATCH_SLICE = 6_000
# Keys deleted per round trip by the background repair.
REPAIR_CHUNK = 500
# A slot map older than this is reloaded in the background even if nothing asked for it: replicas that came
# online (a fresh replica is listed only once it has synced) or were added are then known.
SLOT_MAP_MAX_AGE = 10.0

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


class PermissionRefusedError(NoPermissionError):
    """Redis refused a command to the cache's user (its ACL): a configuration error, never an outage. The
    message names the command and the key or channel (docs/security.md has the whole ACL)."""


_SCRIPT_REFUSED = "The user executing the script can't"
_SCRIPT_COMMANDS = re.compile(r"redis\.call\('(\w+)'")
_CHANNEL_COMMANDS = frozenset({"PUBLISH", "SPUBLISH", "SUBSCRIBE", "SSUBSCRIBE"})
_CONTAINER_COMMANDS = frozenset({"CLUSTER", "CONFIG", "SCRIPT", "XGROUP"})


def refused(error: BaseException, args: tuple[Any, ...], key: bytes | None = None) -> BaseException:
    """`error` (a reply to `args`) explained, when it is an ACL refusal; otherwise `error` as it is."""
    if isinstance(error, PermissionRefusedError):
        return error
    message = str(error)
    if isinstance(error, NoPermissionError):
        command = _text(args[0]).upper()
        if command in _CONTAINER_COMMANDS and len(args) > 1:
            command += " " + _text(args[1]).upper()  # ACLs grant these by subcommand: `+cluster|slots`
    elif message.startswith(_SCRIPT_REFUSED) and _text(args[0]).upper() in ("EVAL", "EVALSHA"):
        called = sorted(set(_SCRIPT_COMMANDS.findall(_text(args[1])))) if len(args) > 1 else []
        command = f"one of the commands of a script ({', '.join(called).upper() or 'unknown'})"
    else:
        return error
    target, grant = "", "this command"
    if key is not None:
        kind = "channel" if _text(args[0]).upper() in _CHANNEL_COMMANDS else "key"
        target = f" on {kind} {key.decode(errors='replace')!r}"
        grant = f"this command and a pattern covering the {kind}"
    explained = PermissionRefusedError(
        f"Redis refused {command}{target} to the cache's user ({message}): grant the user {grant} "
        "(docs/security.md has the whole ACL)"
    )
    explained.__cause__ = error
    return explained


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NotAClusterError(Exception):
    """A LOCATION node answered, but it is not a Redis Cluster node (cluster support disabled)."""


class NoNodeReachableError(RedisConnectionError):
    """None of the startup nodes (nor any known node) answered CLUSTER SLOTS."""


@dataclass(slots=True)
class Call:
    """One command for the node owning `key`. `read` calls may be served by a replica when allowed."""

    key: bytes
    args: tuple[Any, ...]
    read: bool = False
    # When set, the call goes to this node with ASKING first (a slot in migration); topology-internal.
    asking: NodeAddress | None = None
    # False for commands that must not run twice (INCRBY, RPUSH): never re-sent after a lost reply.
    idempotent: bool = True
    # A write of a key that holds a cache entry or a tag version, whose deletion can only make reads miss:
    # when this write is dropped, or acknowledged shortly before its node fails, the topology deletes the
    # key rather than let an older copy be served (failover repair, docs/failure.md). Never set for
    # streams, locks, namespace generations or lists: deleting those loses data.
    repairable: bool = False


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
    def from_cluster_slots(cls, reply: list[Any], queried: NodeAddress) -> SlotMap:
        """Build from a CLUSTER SLOTS reply; an empty host means 'the node you asked'."""

        def address(entry: list[Any]) -> NodeAddress:
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

    def replica_count(self, key: bytes) -> int:
        """How many replicas this map lists for `key`'s slot."""
        return len(self.replicas[key_slot(key)])

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
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while the map is being reloaded
    # Held by the one background reload thread while it runs, taken without waiting: a request that finds
    # it taken goes on with the map it has rather than wait for a whole reload, which a hung node can make
    # last a connect timeout per node asked.
    background_refresh: threading.Lock = field(default_factory=threading.Lock)
    breakers: Breakers = field(init=False)
    repair: FailoverRepair = field(init=False)

    def __post_init__(self) -> None:
        renew_locks_after_fork(self, "lock", "background_refresh")
        self.repair = FailoverRepair(self)
        self.breakers = Breakers(
            self.settings.breaker_threshold,
            self.settings.breaker_cooldown,
            on_close=self.repair.node_back,
            on_open=self.repair.node_failed,
        )

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

    def wants_refresh(self) -> bool:
        """Should a call start a background reload of the slot map now?"""
        age = time.monotonic() - self.last_refresh
        return age >= SLOT_MAP_MAX_AGE or (
            self.refresh_wanted and age >= self.settings.topology_refresh_interval
        )

    def install(self, slot_map: SlotMap) -> None:
        with self.repair.held_lock:
            self.repair.nodes_left(slot_map.primary_nodes)
            self.slot_map = slot_map
        self.last_refresh = time.monotonic()
        self.refresh_wanted = False

    def fallback_replica(self, call: Call, primary: NodeAddress) -> NodeAddress | None:
        """A replica of `primary` that may serve `call` while the primary is unreachable, if any."""
        if not self.settings.replica_fallback or not call.read or call.asking is not None:
            return None
        slot_map = self.slot_map
        if slot_map is None or self.repair.may_be_older_on_replicas(call.key, primary):
            return None
        for replica in slot_map.replicas[key_slot(call.key)]:
            if self.breakers(replica).state == CLOSED:
                return replica
        return None

    def redirect(self, error: AskError, call: Call, node: NodeAddress) -> Call:
        """The call to send after `node` answered MOVED/ASK."""
        target = NodeAddress(error.host, int(error.port))
        if isinstance(error, MovedError):
            self.repair.slot_left(node, error.slot_id, target)
            if self.slot_map is not None:
                self.slot_map.patch(error.slot_id, target)
            self.refresh_wanted = True
            return Call(call.key, call.args, False, idempotent=call.idempotent)
        return Call(call.key, call.args, False, asking=target, idempotent=call.idempotent)


def group_by_node(
    calls: list[Call], route: Callable[[Call], NodeAddress | None]
) -> dict[NodeAddress | None, list[int]]:
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
        # RESP2, as the async connections speak (multiplex.py), and what lets a batch's replies come
        # straight from hiredis's reader (cluster.py _read_replies); redis-py >= 8 would pick RESP3.
        "protocol": 2,
    }
    if settings.ssl:
        kwargs.update(settings.ssl_options)
    return kwargs
