"""Redis Cluster topology: a per-node connection chosen from the slot map, MOVED/ASK followed.

Commands go straight to the node that owns the key's slot over a plain redis-py connection (no per-call
routing machinery), so a GET costs what it costs against a standalone Redis. Batches are grouped per node,
each node's commands are packed into one write, every node is written before any reply is read, and then
replies are read node by node: the round trips overlap.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ResponseError
from redis.retry import Retry

from ..conf import ConnectionSettings, NodeAddress
from .base import (
    BREAKER_ERRORS,
    MAX_REDIRECTS,
    OUTAGE_ERRORS,
    REDIRECT_ERRORS,
    TIMEOUT_ERRORS,
    Call,
    NoNodeReachableError,
    NotAClusterError,
    SlotMap,
    TopologyState,
    connection_kwargs,
    group_by_node,
    is_outage,
)

try:  # hiredis packs a command in C; redis-py's own packer is the fallback
    from hiredis import pack_command as _pack_one
except ImportError:  # pragma: no cover - hiredis is a dependency of the [hiredis] and [dev] extras
    _pack_one = None

try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover - a redis-py without its hiredis parser
    _NOT_ENOUGH_DATA = None

logger = logging.getLogger("django_distcache.topology")


def _read_replies(connection: redis.Connection, count: int) -> list[Any]:
    """The next `count` replies of a pipelined batch, error replies as exception objects.

    With redis-py's hiredis parser the replies are taken straight from its C reader, one socket read for
    many replies; otherwise one read_response() per reply. (Uses the parser's reader, which redis-py keeps
    private; any other parser takes the slow, public path.)
    """
    parser = getattr(connection, "_parser", None)
    reader = getattr(parser, "_reader", None)
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


MAX_IDLE_CONNECTIONS = 64
_all_sync_pools: weakref.WeakSet[_NodePool] = weakref.WeakSet()


def _readonly_on_connect(connection: redis.Connection) -> None:
    connection.on_connect()
    connection.send_command("READONLY")
    connection.read_response()


async def _async_readonly_on_connect(connection: redis.asyncio.Connection) -> None:
    await connection.on_connect()
    await connection.send_command("READONLY")
    await connection.read_response()


def _check_cluster_reply(error: ResponseError, node: NodeAddress) -> None:
    if "cluster support disabled" in str(error).lower():
        raise NotAClusterError(
            f"{node} is a Redis server without cluster mode; LOCATION must name Redis Cluster nodes"
        ) from error


class _NodePool:
    """Idle connections to one node. Lighter than redis-py's pool: no per-call socket poll."""

    def __init__(self, connection_class: type, kwargs: dict[str, Any]) -> None:
        self.connection_class = connection_class
        self.kwargs = kwargs
        self.idle: collections.deque = collections.deque()
        _all_sync_pools.add(self)

    def get(self) -> redis.Connection:
        try:
            return self.idle.pop()
        except IndexError:
            return self.connection_class(**self.kwargs)

    def put(self, connection: redis.Connection) -> None:
        if len(self.idle) < MAX_IDLE_CONNECTIONS:
            self.idle.append(connection)
        else:
            connection.disconnect()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().disconnect()


def _forget_pools_after_fork() -> None:
    # A child process must never share its parent's sockets.
    for pool in list(_all_sync_pools):
        pool.idle.clear()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


class _TopologyCommon:
    """What the sync and async topologies share: settings, slot map, routing."""

    connection_module: Any = redis

    @staticmethod
    def _pack(connection: Any, commands: list[tuple]) -> Any:
        if _pack_one is not None:
            return [b"".join([_pack_one(command) for command in commands])]
        return connection.pack_commands(commands)

    def _group(self, calls: list[Call]) -> dict[NodeAddress | None, list[int]]:
        """Indexes of `calls` per target node; the common case (primaries, no ASK) in one tight loop."""
        slot_map = self.state.slot_map
        if slot_map is None or self.settings.read_from_replicas:
            return group_by_node(calls, self._route)
        primaries = slot_map.primaries
        groups: dict[NodeAddress | None, list[int]] = {}
        for index, call in enumerate(calls):
            node = call.asking or primaries[key_slot(call.key)]
            group = groups.get(node)
            if group is None:
                groups[node] = [index]
            else:
                group.append(index)
        return groups

    def __init__(self, state: TopologyState) -> None:
        self.state = state
        self.settings: ConnectionSettings = state.settings
        self._pools: dict[tuple[NodeAddress, bool], Any] = {}
        self._clients: dict[NodeAddress, Any] = {}

    def _route(self, call: Call) -> NodeAddress | None:
        if call.asking is not None:
            return call.asking
        slot_map = self.state.slot_map
        if slot_map is None:
            return None
        return slot_map.node_for(call.key, call.read, self.settings.read_from_replicas)

    def _is_replica(self, node: NodeAddress) -> bool:
        slot_map = self.state.slot_map
        return slot_map is not None and node in slot_map.replica_nodes and node not in slot_map.primary_nodes

    def _pool_args(self, node: NodeAddress, readonly: bool) -> tuple[type, dict[str, Any]]:
        module = self.connection_module
        connection_class = module.SSLConnection if self.settings.ssl else module.Connection
        kwargs = connection_kwargs(self.settings, node)
        kwargs["retry"] = Retry(NoBackoff(), 0)
        if readonly:
            kwargs["redis_connect_func"] = (
                _async_readonly_on_connect if module is redis.asyncio else _readonly_on_connect
            )
        return connection_class, kwargs

    @staticmethod
    def _slots_call() -> tuple:
        return ("CLUSTER", "SLOTS")

    def _client_for(self, key: bytes, client_class: type) -> Any:
        node = self.state.slot_map.node_for(key) if self.state.slot_map else None
        if node is None:
            raise NoNodeReachableError("no node serves this key's slot")
        client = self._clients.get(node)
        if client is None:
            _, kwargs = self._pool_args(node, False)
            del kwargs["retry"]
            client = self._clients[node] = client_class(**kwargs, ssl=self.settings.ssl)
        return client

    def primaries(self) -> list[NodeAddress]:
        slot_map = self.state.slot_map
        return list(slot_map.primary_nodes) if slot_map else []


class ClusterTopology(_TopologyCommon):
    """Synchronous I/O over the slot map. Thread-safe: connections are taken per call."""

    def _pool(self, node: NodeAddress) -> _NodePool:
        readonly = self.settings.read_from_replicas and self._is_replica(node)
        pool = self._pools.get((node, readonly))
        if pool is None:
            pool = self._pools[(node, readonly)] = _NodePool(*self._pool_args(node, readonly))
        return pool

    # -- topology ---------------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Reload the slot map from the first node that answers; rate-limited unless forced."""
        state = self.state
        if not force and state.slot_map is not None and not state.refresh_due():
            return
        with state.lock:
            if not force and state.slot_map is not None and not state.refresh_due():
                return
            errors = []
            for node in state.nodes_to_ask():
                breaker = state.breakers(node)
                if not breaker.allow():
                    errors.append(f"{node}: circuit open")
                    continue
                pool = self._pool(node)
                connection = pool.get()
                try:
                    connection.send_command(*self._slots_call())
                    reply = connection.read_response()
                except ResponseError as error:
                    pool.put(connection)
                    _check_cluster_reply(error, node)
                    errors.append(f"{node}: {error}")
                    continue
                except OUTAGE_ERRORS as error:
                    connection.disconnect()
                    breaker.failure(error)
                    errors.append(f"{node}: {error}")
                    continue
                breaker.success()
                pool.put(connection)
                slot_map = SlotMap.from_cluster_slots(reply, node)
                if slot_map.covered == 0:
                    errors.append(f"{node}: no slots assigned")
                    continue
                state.install(slot_map)
                return
            state.last_refresh = time.monotonic()
            raise NoNodeReachableError("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    def ensure_map(self) -> None:
        state = self.state
        if state.slot_map is None:
            self.refresh(force=True)
        elif state.refresh_wanted and state.refresh_due():
            self._refresh_in_background()

    def _refresh_in_background(self) -> None:
        """Reload the slot map in a thread of its own: a request never waits for CLUSTER SLOTS (which a
        hung node would make it do), and one refresher runs at a time, rate-limited."""
        state = self.state
        if state.refreshing or not state.refresh_due():
            return
        with state.lock:
            if state.refreshing:
                return
            state.refreshing = True

        def run() -> None:
            try:
                self.refresh()
            except OUTAGE_ERRORS as error:
                logger.debug("background slot map refresh failed: %s", error)
            finally:
                state.refreshing = False

        threading.Thread(target=run, name="distcache-topology-refresh", daemon=True).start()

    # -- commands ---------------------------------------------------------------------------------------
    def execute(self, call: Call) -> Any:
        """Run one call; follows redirects, retries a dropped connection, raises errors as they are."""
        self.ensure_map()
        retries = self.settings.retries
        for _ in range(MAX_REDIRECTS + retries + 1):
            node = self._route(call)
            if node is None:
                raise NoNodeReachableError(f"no node serves the slot of {call.key[:60]!r}")
            breaker = self.state.breakers(node)
            if not breaker.allow():
                self.state.refresh_wanted = True
                self._refresh_in_background()  # a promoted replica may already serve the slot
                raise breaker.unavailable()
            pool = self._pool(node)
            connection = pool.get()
            try:
                if call.asking is not None:
                    connection.send_packed_command(
                        self._pack(connection, [("ASKING",), call.args]), check_health=False
                    )
                    connection.read_response()
                else:
                    connection.send_packed_command(self._pack(connection, [call.args]), check_health=False)
                result = connection.read_response()
            except REDIRECT_ERRORS as error:
                pool.put(connection)
                breaker.success()
                call = self.state.redirect(error, call)
                continue
            except ResponseError as error:
                pool.put(connection)
                breaker.success()  # the node answered
                if not is_outage(error):
                    raise
                # OOM or READONLY (a write that reached a demoted primary): the slot map may be stale.
                self.state.refresh_wanted = True
                raise
            except OUTAGE_ERRORS as error:
                connection.disconnect()
                self.state.refresh_wanted = True
                opened = isinstance(error, BREAKER_ERRORS) and breaker.failure(error)
                self._refresh_in_background()
                # Sent again only after a dropped connection (an idle socket the server closed), never
                # after a timeout: a hung node would make the caller wait twice.
                if (
                    retries <= 0
                    or not call.idempotent
                    or opened
                    or breaker.state != "closed"
                    or isinstance(error, TIMEOUT_ERRORS)
                ):
                    raise
                retries -= 1
                continue
            pool.put(connection)
            breaker.success()
            return result
        raise NoNodeReachableError(f"too many redirects for {call.key[:60]!r}")

    def execute_batch(self, calls: list[Call]) -> list[Any]:
        """Run many calls, one pipelined write per node, all writes before any read."""
        if not calls:
            return []
        self.ensure_map()
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(MAX_REDIRECTS + 1):
            redo = self._batch_round([calls[i] for i in pending], pending, results)
            if not redo:
                return results
            pending = [index for index, _ in redo]
            for index, error in redo:
                calls[index] = self.state.redirect(error, calls[index])
            if self.state.refresh_wanted:
                self._refresh_in_background()
        for index in pending:
            results[index] = NoNodeReachableError("too many redirects")
        return results

    def _batch_round(self, calls: list[Call], positions: list[int], results: list[Any]) -> list:
        groups = self._group(calls)
        sent = []
        for node, indexes in groups.items():
            if node is None:
                for i in indexes:
                    results[positions[i]] = NoNodeReachableError("slot not served")
                continue
            breaker = self.state.breakers(node)
            if not breaker.allow():
                self.state.refresh_wanted = True
                self._refresh_in_background()
                error = breaker.unavailable()
                for i in indexes:
                    results[positions[i]] = error
                continue
            pool = self._pool(node)
            connection = pool.get()
            commands = []
            for i in indexes:
                if calls[i].asking is not None:
                    commands.append(("ASKING",))
                commands.append(calls[i].args)
            try:
                connection.send_packed_command(self._pack(connection, commands), check_health=False)
            except OUTAGE_ERRORS as error:
                connection.disconnect()
                self.state.refresh_wanted = True
                if isinstance(error, BREAKER_ERRORS):
                    breaker.failure(error)
                for i in indexes:
                    results[positions[i]] = error
                continue
            sent.append((pool, connection, indexes, breaker))
        redirects = []
        for pool, connection, indexes, breaker in sent:
            try:
                asking = sum(1 for i in indexes if calls[i].asking is not None)
                replies = iter(_read_replies(connection, len(indexes) + asking))
                for i in indexes:
                    if calls[i].asking is not None:
                        next(replies)  # ASKING's own +OK; the command's reply says what went wrong
                    reply = next(replies)
                    if isinstance(reply, REDIRECT_ERRORS):
                        redirects.append((positions[i], reply))
                    else:
                        results[positions[i]] = reply
            except OUTAGE_ERRORS as error:
                connection.disconnect()
                self.state.refresh_wanted = True
                if isinstance(error, BREAKER_ERRORS):
                    breaker.failure(error)
                for i in indexes:
                    if results[positions[i]] is None:
                        results[positions[i]] = error
                continue
            pool.put(connection)
            breaker.success()
        if self.state.refresh_wanted:
            self._refresh_in_background()
        return redirects

    # -- node-wide work (purges, checks) -----------------------------------------------------------------
    def node_execute(self, node: NodeAddress, *args: Any) -> Any:
        pool = self._pool(node)
        connection = pool.get()
        try:
            connection.send_command(*args)
            result = connection.read_response()
        except ResponseError:
            pool.put(connection)
            raise
        except BaseException:
            connection.disconnect()
            raise
        pool.put(connection)
        return result

    def dedicated_connection(self, key: bytes) -> redis.Connection:
        """A connection of its own (not pooled) to the primary owning `key`, e.g. for a subscription."""
        self.refresh(force=True)
        node = self.state.slot_map.node_for(key) if self.state.slot_map else None
        if node is None:
            raise NoNodeReachableError("no node serves this key's slot")
        connection_class, kwargs = self._pool_args(node, False)
        connection = connection_class(**kwargs)
        connection.connect()
        return connection

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
        return self._client_for(key, redis.Redis)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


class _AsyncNodePool:
    def __init__(self, connection_class: type, kwargs: dict[str, Any]) -> None:
        self.connection_class = connection_class
        self.kwargs = kwargs
        self.idle: collections.deque = collections.deque()

    def get(self) -> redis.asyncio.Connection:
        try:
            return self.idle.pop()
        except IndexError:
            return self.connection_class(**self.kwargs)

    def put(self, connection: redis.asyncio.Connection) -> None:
        if len(self.idle) < MAX_IDLE_CONNECTIONS:
            self.idle.append(connection)
        else:
            asyncio.ensure_future(connection.disconnect())

    async def close(self) -> None:
        while self.idle:
            await self.idle.pop().disconnect()


class AsyncClusterTopology(_TopologyCommon):
    """The same routing with redis-py's asyncio connections; one instance per event loop."""

    connection_module = redis.asyncio

    def __init__(self, state: TopologyState) -> None:
        super().__init__(state)
        self._refresh_task: asyncio.Task | None = None

    def _pool(self, node: NodeAddress) -> _AsyncNodePool:
        readonly = self.settings.read_from_replicas and self._is_replica(node)
        pool = self._pools.get((node, readonly))
        if pool is None:
            pool = self._pools[(node, readonly)] = _AsyncNodePool(*self._pool_args(node, readonly))
        return pool

    async def refresh(self, force: bool = False) -> None:
        state = self.state
        if not force and state.slot_map is not None and not state.refresh_due():
            return
        errors = []
        for node in state.nodes_to_ask():
            breaker = state.breakers(node)
            if not breaker.allow():
                errors.append(f"{node}: circuit open")
                continue
            pool = self._pool(node)
            connection = pool.get()
            try:
                await connection.send_command(*self._slots_call())
                reply = await connection.read_response()
            except ResponseError as error:
                pool.put(connection)
                _check_cluster_reply(error, node)
                errors.append(f"{node}: {error}")
                continue
            except OUTAGE_ERRORS as error:
                await connection.disconnect()
                breaker.failure(error)
                errors.append(f"{node}: {error}")
                continue
            breaker.success()
            pool.put(connection)
            slot_map = SlotMap.from_cluster_slots(reply, node)
            if slot_map.covered == 0:
                errors.append(f"{node}: no slots assigned")
                continue
            state.install(slot_map)
            return
        state.last_refresh = time.monotonic()
        raise NoNodeReachableError("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    async def ensure_map(self) -> None:
        state = self.state
        if state.slot_map is None:
            await self.refresh(force=True)
        elif state.refresh_wanted and state.refresh_due():
            self._refresh_in_background()

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

        self._refresh_task = asyncio.get_running_loop().create_task(run())

    async def execute(self, call: Call) -> Any:
        await self.ensure_map()
        retries = self.settings.retries
        for _ in range(MAX_REDIRECTS + retries + 1):
            node = self._route(call)
            if node is None:
                raise NoNodeReachableError(f"no node serves the slot of {call.key[:60]!r}")
            breaker = self.state.breakers(node)
            if not breaker.allow():
                self.state.refresh_wanted = True
                self._refresh_in_background()
                raise breaker.unavailable()
            pool = self._pool(node)
            connection = pool.get()
            try:
                if call.asking is not None:
                    await connection.send_packed_command(
                        self._pack(connection, [("ASKING",), call.args]), check_health=False
                    )
                    await connection.read_response()
                else:
                    await connection.send_packed_command(
                        self._pack(connection, [call.args]), check_health=False
                    )
                result = await connection.read_response()
            except REDIRECT_ERRORS as error:
                pool.put(connection)
                breaker.success()
                call = self.state.redirect(error, call)
                continue
            except ResponseError as error:
                pool.put(connection)
                breaker.success()
                if not is_outage(error):
                    raise
                # OOM or READONLY (a write that reached a demoted primary): the slot map may be stale.
                self.state.refresh_wanted = True
                raise
            except OUTAGE_ERRORS as error:
                await connection.disconnect()
                self.state.refresh_wanted = True
                opened = isinstance(error, BREAKER_ERRORS) and breaker.failure(error)
                self._refresh_in_background()
                # Sent again only after a dropped connection (an idle socket the server closed), never
                # after a timeout: a hung node would make the caller wait twice.
                if (
                    retries <= 0
                    or not call.idempotent
                    or opened
                    or breaker.state != "closed"
                    or isinstance(error, TIMEOUT_ERRORS)
                ):
                    raise
                retries -= 1
                continue
            except BaseException:
                # Cancelled mid-command: the reply may still arrive, so this connection is unusable.
                await connection.disconnect()
                raise
            pool.put(connection)
            breaker.success()
            return result
        raise NoNodeReachableError(f"too many redirects for {call.key[:60]!r}")

    async def execute_batch(self, calls: list[Call]) -> list[Any]:
        if not calls:
            return []
        await self.ensure_map()
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(MAX_REDIRECTS + 1):
            redo = await self._batch_round([calls[i] for i in pending], pending, results)
            if not redo:
                return results
            pending = [index for index, _ in redo]
            for index, error in redo:
                calls[index] = self.state.redirect(error, calls[index])
            if self.state.refresh_wanted:
                self._refresh_in_background()
        for index in pending:
            results[index] = NoNodeReachableError("too many redirects")
        return results

    async def _batch_round(self, calls: list[Call], positions: list[int], results: list[Any]) -> list:
        groups = self._group(calls)
        sent = []
        try:
            for node, indexes in groups.items():
                if node is None:
                    for i in indexes:
                        results[positions[i]] = NoNodeReachableError("slot not served")
                    continue
                breaker = self.state.breakers(node)
                if not breaker.allow():
                    self.state.refresh_wanted = True
                    self._refresh_in_background()
                    error = breaker.unavailable()
                    for i in indexes:
                        results[positions[i]] = error
                    continue
                pool = self._pool(node)
                connection = pool.get()
                commands = []
                for i in indexes:
                    if calls[i].asking is not None:
                        commands.append(("ASKING",))
                    commands.append(calls[i].args)
                try:
                    await connection.send_packed_command(self._pack(connection, commands), check_health=False)
                except OUTAGE_ERRORS as error:
                    await connection.disconnect()
                    self.state.refresh_wanted = True
                    if isinstance(error, BREAKER_ERRORS):
                        breaker.failure(error)
                    for i in indexes:
                        results[positions[i]] = error
                    continue
                sent.append((pool, connection, indexes, breaker))
            redirects = []
            while sent:
                pool, connection, indexes, breaker = sent[0]
                try:
                    for i in indexes:
                        if calls[i].asking is not None:
                            try:
                                await connection.read_response()
                            except ResponseError:
                                pass
                        try:
                            results[positions[i]] = await connection.read_response()
                        except REDIRECT_ERRORS as error:
                            redirects.append((positions[i], error))
                        except ResponseError as error:
                            results[positions[i]] = error
                except OUTAGE_ERRORS as error:
                    await connection.disconnect()
                    self.state.refresh_wanted = True
                    if isinstance(error, BREAKER_ERRORS):
                        breaker.failure(error)
                    for i in indexes:
                        if results[positions[i]] is None:
                            results[positions[i]] = error
                    sent.pop(0)
                    continue
                sent.pop(0)
                pool.put(connection)
                breaker.success()
            if self.state.refresh_wanted:
                self._refresh_in_background()
            return redirects
        except BaseException:
            for _, connection, _, _ in sent:
                await connection.disconnect()
            raise

    async def client_for(self, key: bytes) -> redis.asyncio.Redis:
        await self.ensure_map()
        return self._client_for(key, redis.asyncio.Redis)

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()


__all__ = ["AsyncClusterTopology", "ClusterTopology"]
