"""Redis Cluster topology: the I/O. A per-node connection chosen from the slot map, MOVED/ASK followed.

Commands go straight to the node that owns the key's slot over a plain redis-py connection (no per-call
routing machinery), so a GET costs what it costs against a standalone Redis. Batches are grouped per node,
each node's commands are packed into one write, every node is written before any reply is read, and then
replies are read node by node: the round trips overlap.

Every decision (which node, breaker, redirect, retry, replica, repair) is made in steps.py, once; the two
classes here run those steps over blocking connections (`ClusterTopology`: a pool per node, a connection
per thread at a time) or multiplexed asyncio connections (`AsyncClusterTopology`: one per node and event
loop, shared by its coroutines; multiplex.py), and own the background refresh and the background repair.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

from ..conf import ConnectionSettings, NodeAddress
from .base import (
    BATCH_SLICE,
    BREAKER_ERRORS,
    MAX_REDIRECTS,
    OUTAGE_ERRORS,
    REPAIR_CHUNK,
    TIMEOUT_ERRORS,
    Call,
    NoNodeReachableError,
    PermissionRefusedError,
    TopologyState,
    connection_kwargs,
    refused,
)
from .multiplex import Multiplexed, NodeLink, pack
from .steps import IO_ERRORS, ClusterSteps, Command, Read, Send, drive, drive_async, too_many_redirects
from .subscription import Subscription

_pack_one: Callable[[Command], bytes] | None
try:  # hiredis packs a command in C; redis-py's own packer is the fallback
    from hiredis import pack_command as _pack_one
except ImportError:  # pragma: no cover - hiredis is a dependency of the [hiredis] and [dev] extras
    _pack_one = None

_NOT_ENOUGH_DATA: object
try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - a redis-py without its hiredis parser
    _NOT_ENOUGH_DATA = None

logger = logging.getLogger("django_distcache.topology")

MAX_IDLE_CONNECTIONS = 64


class _Connection(Protocol):
    """What the topology needs of a redis-py connection."""

    protocol: Any

    def connect(self) -> None: ...
    def send_packed_command(self, command: Any, check_health: bool = True) -> None: ...
    def send_command(self, *args: Any, **kwargs: Any) -> None: ...
    def read_response(self, *args: Any, **kwargs: Any) -> Any: ...
    def can_read(self, timeout: float = 0) -> bool: ...
    def pack_commands(self, commands: list[Command]) -> list[bytes]: ...
    def disconnect(self, *args: Any) -> None: ...


def _pack(connection: _Connection, commands: list[Command]) -> list[bytes]:
    if _pack_one is not None:
        return [b"".join([_pack_one(command) for command in commands])]
    return connection.pack_commands(commands)


def _last_reply(replies: list[Any]) -> Any:
    """The reply of a call sent after other commands (ASKING, a repair DEL): the first error among them is
    raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies[-1]


def _read_replies(connection: _Connection, count: int) -> list[Any]:
    """The next `count` replies of a pipelined batch, error replies as exception objects.

    With redis-py's hiredis parser the replies are taken straight from its C reader, one socket read for
    many replies; otherwise one read_response() per reply. (Uses the parser's reader, which redis-py keeps
    private; any other parser takes the slow, public path.)
    """
    parser: Any = getattr(connection, "_parser", None)
    reader: Any = getattr(parser, "_reader", None)
    replies: list[Any] = []
    if reader is None or _NOT_ENOUGH_DATA is None or str(connection.protocol) not in ("2", "None"):
        for _ in range(count):
            try:
                replies.append(connection.read_response())
            except ResponseError as error:
                replies.append(error)
        return replies
    gets, read_more = reader.gets, parser.read_from_socket
    while len(replies) < count:
        reply = gets()
        if reply is _NOT_ENOUGH_DATA:
            read_more()
        else:
            replies.append(reply)
    return replies


def _readonly_on_connect(connection: Any) -> None:
    connection.on_connect()
    connection.send_command("READONLY")
    connection.read_response()


def _connection_args(
    settings: ConnectionSettings, node: NodeAddress, readonly: bool
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The connection class and arguments for `node`; `readonly`: READONLY first (a replica serving reads)."""
    connection_class = redis.SSLConnection if settings.ssl else redis.Connection
    kwargs = connection_kwargs(settings, node)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    if readonly:
        kwargs["redis_connect_func"] = _readonly_on_connect
    return connection_class, kwargs


def _client_args(topology: ClusterSteps, key: bytes) -> tuple[NodeAddress, dict[str, Any]]:
    """The primary owning `key`, and the arguments of a redis-py client bound to it (used for locks)."""
    node = topology.state.slot_map.node_for(key) if topology.state.slot_map else None
    if node is None:
        raise NoNodeReachableError("no node serves this key's slot")
    kwargs = connection_kwargs(topology.settings, node)
    kwargs["ssl"] = topology.settings.ssl
    return node, kwargs


_all_sync_pools: weakref.WeakSet[_NodePool] = weakref.WeakSet()


class _NodePool:
    """Idle connections to one node. Lighter than redis-py's pool: no per-call socket poll."""

    def __init__(self, connection_class: Callable[..., _Connection], kwargs: dict[str, Any]) -> None:
        self.connection_class = connection_class
        self.kwargs = kwargs
        self.idle: collections.deque[_Connection] = collections.deque()
        _all_sync_pools.add(self)

    def get(self) -> _Connection:
        try:
            return self.idle.pop()
        except IndexError:
            return self.connection_class(**self.kwargs)

    def put(self, connection: _Connection) -> None:
        if len(self.idle) < MAX_IDLE_CONNECTIONS:
            self.idle.append(connection)
        else:
            connection.disconnect()

    def discard(self, connection: _Connection, error: BaseException) -> None:
        """Close `connection`, which failed with `error`. A dropped connection (not a timeout) says the
        node's end went away (a restart, CLIENT KILL, a failover): the idle ones, opened before, are closed
        too, so that the call sent again gets a new connection instead of another dead one."""
        connection.disconnect()
        if isinstance(error, BREAKER_ERRORS) and not isinstance(error, TIMEOUT_ERRORS):
            self.close()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().disconnect()


def _forget_pools_after_fork() -> None:
    # A child process must never share its parent's sockets.
    for pool in list(_all_sync_pools):
        pool.idle.clear()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


@dataclass(eq=False, slots=True)
class _Sent:
    """One node's part of a batch round: written, its replies not read yet."""

    pool: _NodePool
    connection: _Connection


def _start_claimed(claim: threading.Lock, work: Callable[[], None], name: str) -> None:
    """Run `work` in a daemon thread that releases `claim` (already acquired) when it ends, or at once if
    the thread cannot start."""

    def run() -> None:
        try:
            work()
        finally:
            claim.release()

    try:
        threading.Thread(target=run, name=name, daemon=True).start()
    except BaseException:
        claim.release()
        raise


class ClusterTopology(ClusterSteps):
    """Synchronous I/O over the slot map. Thread-safe: connections are taken per call."""

    def __init__(self, state: TopologyState) -> None:
        super().__init__(state)
        self._pools: dict[tuple[NodeAddress, bool], _NodePool] = {}
        self._clients: dict[NodeAddress, redis.Redis] = {}
        # Whether the cluster has sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis >= 7.0); None until a
        # subscription found out.
        self.sharded_pubsub: bool | None = None

    def _pool(self, node: NodeAddress) -> _NodePool:
        readonly = self._readonly(node)
        pool = self._pools.get((node, readonly))
        if pool is None:
            pool = self._pools[(node, readonly)] = _NodePool(*_connection_args(self.settings, node, readonly))
        return pool

    # -- the slot map -----------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Reload the slot map from the first node that answers; rate-limited unless forced."""
        state = self.state
        if not force and state.slot_map is not None and not state.refresh_due():
            return
        with state.lock:
            if not force and state.slot_map is not None and not state.refresh_due():
                return
            drive(self.refresh_steps(), self._ask_slots)
        if state.repair.wanted:  # the new map names nodes that lost keys: repair now, not at the next call
            self.repair_in_background()

    def _ask_slots(self, node: NodeAddress) -> Any:
        return self.node_execute(node, "CLUSTER", "SLOTS")

    def ensure_map(self) -> None:
        state = self.state
        if state.slot_map is None:
            self.refresh(force=True)
        elif state.wants_refresh():
            self._refresh_in_background()
        if state.repair.due_now():
            self.repair_in_background()

    def _refresh_in_background(self) -> None:
        """Reload the slot map in a thread of its own: a request never waits for CLUSTER SLOTS (which a
        hung node would make it do), and one refresher runs at a time, rate-limited."""
        state = self.state
        if not state.refresh_due() or not state.background_refresh.acquire(blocking=False):
            return

        def run() -> None:
            try:
                self.refresh()
            except OUTAGE_ERRORS as error:
                logger.debug("background slot map refresh failed: %s", error)
            except PermissionRefusedError as error:  # a foreground call raises it too, with its caller
                logger.error("background slot map refresh refused: %s", error)

        _start_claimed(state.background_refresh, run, "distcache-topology-refresh")

    # -- failover repair --------------------------------------------------------------------------------
    def repair_in_background(self) -> None:
        """Delete the keys queued for repair in a thread of its own, one such thread at a time."""
        repair = self.state.repair
        if not repair.running.acquire(blocking=False):
            return
        repair.wanted = False

        def run() -> None:
            try:
                self.repair_now()
            except Exception as error:  # noqa: BLE001 - a background thread: tried again on a later call
                logger.warning("failover repair failed, tried again later: %s", error)
                repair.retry_later()

        _start_claimed(repair.running, run, "distcache-failover-repair")

    def repair_now(self) -> int:
        """Delete the keys queued for repair on their slots' primaries; those that cannot be reached now
        stay queued and are tried again a breaker cooldown later. Returns how many are left."""
        repair = self.state.repair
        keys = list(repair.pending)
        for start in range(0, len(keys), REPAIR_CHUNK):
            chunk = keys[start : start + REPAIR_CHUNK]
            self.execute_batch([Call(key, ("DEL", key), repairable=True) for key in chunk])
        left = len(repair.pending)
        if left:
            repair.retry_later()
        return left

    # -- commands ---------------------------------------------------------------------------------------
    def execute(self, call: Call) -> Any:
        """Run one call; follows redirects, retries a dropped connection, raises errors as they are."""
        self.ensure_map()
        retries = self.settings.retries
        for _ in range(MAX_REDIRECTS + retries + 1):
            node, breaker, commands, repairing = self.attempt(call)
            try:
                reply = self._exchange(node, commands)
            except IO_ERRORS as error:
                call, retries = self.failed(call, node, breaker, error, retries)
                continue
            self.succeeded(call, node, breaker, repairing)
            return reply
        raise too_many_redirects(call)

    def _exchange(self, node: NodeAddress, commands: list[Command]) -> Any:
        """Send `commands` to `node` in one write; the reply of the last (the first error reply raised)."""
        pool = self._pool(node)
        connection = pool.get()
        try:
            connection.send_packed_command(_pack(connection, commands), check_health=False)
            if len(commands) == 1:
                reply = connection.read_response()
            else:
                reply = _last_reply(_read_replies(connection, len(commands)))
        except ResponseError:
            pool.put(connection)  # every reply was read: the connection is clean
            raise
        except BaseException as error:
            pool.discard(connection, error)
            raise
        pool.put(connection)
        return reply

    def execute_batch(self, calls: list[Call]) -> list[Any]:
        """Run many calls, one pipelined write per node, all writes before any read (in slices of
        BATCH_SLICE calls, so that no write carries more than its socket timeout can cover)."""
        results: list[Any] = []
        for start in range(0, len(calls), BATCH_SLICE):
            self.ensure_map()
            results += self._execute_slice(calls[start : start + BATCH_SLICE])
        return results

    def _execute_slice(self, calls: list[Call]) -> list[Any]:
        unread: list[_Sent] = []
        try:
            return drive(self.slice_steps(calls), functools.partial(self._batch_io, unread))
        except BaseException:
            for sent in unread:  # its replies would be read as another command's
                sent.connection.disconnect()
            raise

    def _batch_io(self, unread: list[_Sent], step: Send | Read) -> Any:
        if isinstance(step, Read):
            sent: _Sent = step.handle
            unread.remove(sent)
            try:
                replies = _read_replies(sent.connection, step.count)
            except BaseException as error:
                sent.pool.discard(sent.connection, error)
                raise
            sent.pool.put(sent.connection)
            return replies
        pool = self._pool(step.node)
        connection = pool.get()
        try:
            connection.send_packed_command(_pack(connection, step.commands), check_health=False)
        except BaseException as error:
            pool.discard(connection, error)
            raise
        unread.append(_Sent(pool, connection))
        return unread[-1]

    # -- node-wide work (purges, checks), locks, subscriptions -------------------------------------------
    def node_execute(self, node: NodeAddress, *args: Any) -> Any:
        pool = self._pool(node)
        connection = pool.get()
        try:
            connection.send_command(*args)
            result = connection.read_response()
        except ResponseError as error:
            pool.put(connection)
            raise refused(error, args)  # noqa: B904 - the reply is its cause
        except BaseException:
            connection.disconnect()
            raise
        pool.put(connection)
        return result

    def scan(self, node: NodeAddress, match: str, count: int = 1000) -> Iterator[list[bytes]]:
        cursor = b"0"
        while True:
            cursor, keys = self.node_execute(node, "SCAN", cursor, "MATCH", match, "COUNT", count)
            if keys:
                yield keys
            if cursor in (b"0", 0, "0"):
                return

    def client_for(self, key: bytes) -> redis.Redis:
        """A redis-py client bound to the node owning `key` (used for locks), one per node."""
        self.ensure_map()
        node, kwargs = _client_args(self, key)
        client = self._clients.get(node)
        if client is None:
            client = self._clients[node] = redis.Redis(**kwargs)
        return client

    def subscribe(self, channels: list[bytes], ping_every: float = 1.0) -> Subscription:
        """A connection of its own to the primary serving `channels` (all of one slot), subscribed to them,
        probed with PING after `ping_every` seconds of silence. Raises PermissionRefusedError when the ACL
        refuses the channel, an outage error when the node cannot be reached."""
        self.refresh(force=True)
        node = self.state.slot_map.node_for(channels[0]) if self.state.slot_map else None
        if node is None:
            raise NoNodeReachableError("no node serves this channel's slot")
        connection_class, kwargs = _connection_args(self.settings, node, False)
        connection: _Connection = connection_class(**kwargs)
        connection.connect()
        subscription = Subscription(connection, node, ping_every)
        try:
            subscription.start(channels, self.sharded_pubsub)
        except BaseException:
            subscription.close()
            raise
        finally:
            if subscription.sharded is not None:
                self.sharded_pubsub = subscription.sharded
        return subscription

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


class AsyncClusterTopology(ClusterSteps):
    """The same steps over multiplexed asyncio connections (multiplex.py): one per node and event loop,
    shared by every coroutine of the loop. One instance per event loop."""

    def __init__(self, state: TopologyState) -> None:
        super().__init__(state)
        self._links: dict[tuple[NodeAddress, bool], NodeLink] = {}
        self._clients: dict[NodeAddress, redis.asyncio.Redis] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._repairer: ClusterTopology | None = None

    async def _connection(self, node: NodeAddress) -> Multiplexed:
        """The node's shared connection, opened if need be (open errors are raised here)."""
        readonly = self._readonly(node)
        link = self._links.get((node, readonly))
        if link is None:
            link = self._links[(node, readonly)] = NodeLink(self.settings, node, readonly)
        connection = link.connection
        if connection is not None and connection.failure is None:
            return connection
        return await link.connect()

    # -- the slot map -----------------------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> None:
        state = self.state
        if not force and state.slot_map is not None and not state.refresh_due():
            return
        await drive_async(self.refresh_steps(), self._ask_slots)
        if state.repair.wanted:
            self._repair_in_background()

    def _ask_slots(self, node: NodeAddress) -> Awaitable[Any]:
        return self._node_execute(node, "CLUSTER", "SLOTS")

    async def _node_execute(self, node: NodeAddress, *args: Any) -> Any:
        connection = await self._connection(node)
        reply = await connection.submit(pack([args]), 1)
        if isinstance(reply, ResponseError):
            raise refused(reply, args)
        return reply

    async def ensure_map(self) -> None:
        state = self.state
        if state.slot_map is None:
            await self.refresh(force=True)
        elif state.wants_refresh():
            self._refresh_in_background()
        if state.repair.due_now():
            self._repair_in_background()

    def _repair_in_background(self) -> None:
        # The repair runs in a thread with blocking connections of its own, whatever the loop.
        if self._repairer is None:
            self._repairer = ClusterTopology(self.state)
        self._repairer.repair_in_background()

    def _refresh_in_background(self) -> None:
        """As the sync topology's: one task on this loop reloads the slot map; callers do not wait."""
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        if not self.state.refresh_due():
            return

        async def run() -> None:
            try:
                await self.refresh()
            except OUTAGE_ERRORS as error:
                logger.debug("background slot map refresh failed: %s", error)
            except PermissionRefusedError as error:  # a foreground call raises it too, with its caller
                logger.error("background slot map refresh refused: %s", error)

        self._refresh_task = asyncio.get_running_loop().create_task(run())

    # -- commands ---------------------------------------------------------------------------------------
    async def execute(self, call: Call) -> Any:
        await self.ensure_map()
        retries = self.settings.retries
        for _ in range(MAX_REDIRECTS + retries + 1):
            node, breaker, commands, repairing = self.attempt(call)
            try:
                reply = await self._exchange(node, commands)
            except IO_ERRORS as error:
                call, retries = self.failed(call, node, breaker, error, retries)
                continue
            self.succeeded(call, node, breaker, repairing)
            return reply
        raise too_many_redirects(call)

    async def _exchange(self, node: NodeAddress, commands: list[Command]) -> Any:
        connection = await self._connection(node)  # an open that fails raises here
        if len(commands) == 1:
            reply = await connection.submit(pack(commands), 1)
            if isinstance(reply, Exception):
                raise reply
            return reply
        return _last_reply(await connection.submit(pack(commands), len(commands)))

    async def execute_batch(self, calls: list[Call]) -> list[Any]:
        results: list[Any] = []
        for start in range(0, len(calls), BATCH_SLICE):
            await self.ensure_map()
            results += await self._execute_slice(calls[start : start + BATCH_SLICE])
        return results

    async def _execute_slice(self, calls: list[Call]) -> list[Any]:
        # A caller cancelled mid-batch leaves nothing to clean up: the replies still owed to it are read
        # and dropped by the shared connections.
        return await drive_async(self.slice_steps(calls), self._batch_io)

    async def _batch_io(self, step: Send | Read) -> Any:
        if isinstance(step, Read):
            future: asyncio.Future[Any] = step.handle
            reply = await future
            return [reply] if step.count == 1 else reply
        connection = await self._connection(step.node)
        return connection.submit(pack(step.commands), len(step.commands))

    async def client_for(self, key: bytes) -> redis.asyncio.Redis:
        await self.ensure_map()
        node, kwargs = _client_args(self, key)
        client = self._clients.get(node)
        if client is None:
            client = self._clients[node] = redis.asyncio.Redis(**kwargs)
        return client

    async def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


__all__ = ["AsyncClusterTopology", "ClusterTopology"]
