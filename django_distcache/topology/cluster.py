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
from collections.abc import Generator, Iterator
from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ResponseError
from redis.retry import Retry

from ..conf import ConnectionSettings, NodeAddress
from .base import (
    BATCH_SLICE,
    BREAKER_ERRORS,
    MAX_REDIRECTS,
    OUTAGE_ERRORS,
    REDIRECT_ERRORS,
    REPAIR_CHUNK,
    TIMEOUT_ERRORS,
    Call,
    NoNodeReachableError,
    NotAClusterError,
    PermissionRefusedError,
    SlotMap,
    TopologyState,
    connection_kwargs,
    group_by_node,
    is_outage,
    refused,
)
from .breaker import CLOSED, OPEN, Breaker, NodeUnavailableError

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
# Connections one asyncio pool (one node, one event loop) opens at the same time; at least the breaker's
# threshold, so that a burst of callers against a dead node waits for one round of connect timeouts at most.
MAX_OPENING_CONNECTIONS = 8
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
    if isinstance(error, PermissionRefusedError):
        raise error  # the user may not read the slot map: every node will say so, and it is no outage
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


def _start_claimed(claim: threading.Lock, work: Any, name: str) -> None:
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


class _TopologyCommon:
    """What the sync and async topologies share: settings, slot map, routing, and every decision taken
    around a command (which node, breaker, fallback, retry, redirect). The subclasses only move bytes."""

    connection_module: Any = redis

    def __init__(self, state: TopologyState) -> None:
        self.state = state
        self.settings: ConnectionSettings = state.settings
        self._pools: dict[tuple[NodeAddress, bool], Any] = {}
        self._clients: dict[NodeAddress, Any] = {}

    def _refresh_in_background(self) -> None:  # pragma: no cover - both subclasses define it
        raise NotImplementedError

    @staticmethod
    def _pack(connection: Any, commands: list[tuple]) -> Any:
        if _pack_one is not None:
            return [b"".join([_pack_one(command) for command in commands])]
        return connection.pack_commands(commands)

    def _commands(self, call: Call, node: NodeAddress) -> tuple[list[tuple], bool]:
        """What to send for `call` to `node`, and whether that starts with a repair: ASKING before a command
        for a slot being imported; DEL of the key first when its value may be older than this process
        wrote."""
        state = self.state
        repairing = bool(state.repair.pending or state.repair.unsynced) and state.repair.due(call, node)
        if not repairing:
            return ([("ASKING",), call.args] if call.asking is not None else [call.args]), False
        if call.asking is not None:
            return [("ASKING",), ("DEL", call.key), ("ASKING",), call.args], True
        return [("DEL", call.key), call.args], True

    @staticmethod
    def _last_reply(replies: list) -> Any:
        """The reply of `call` sent after other commands: the first error among them is raised."""
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies[-1]

    # -- routing ----------------------------------------------------------------------------------------
    def _route(self, call: Call) -> NodeAddress | None:
        if call.asking is not None:
            return call.asking
        slot_map = self.state.slot_map
        if slot_map is None:
            return None
        if call.read and self.state.repair.pending and call.key in self.state.repair.pending:
            return slot_map.primaries[key_slot(call.key)]  # a replica could not delete it first
        return slot_map.node_for(call.key, call.read, self.settings.read_from_replicas)

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

    def _is_replica(self, node: NodeAddress) -> bool:
        slot_map = self.state.slot_map
        return slot_map is not None and node in slot_map.replica_nodes and node not in slot_map.primary_nodes

    def _readonly(self, node: NodeAddress) -> bool:
        """Connections to a replica send READONLY first, so that it serves reads of its slots."""
        settings = self.settings
        return (settings.read_from_replicas or settings.replica_fallback) and self._is_replica(node)

    def _unavailable(self, breaker: Breaker) -> NodeUnavailableError:
        """A call may not go to `breaker`'s node: a promoted replica may already serve its slots."""
        self.state.refresh_wanted = True
        self._refresh_in_background()
        return breaker.unavailable()

    def _substitute(self, call: Call, node: NodeAddress) -> NodeAddress | None:
        """Another node that may serve the read `call` while `node` is unavailable, or None."""
        if self.settings.read_from_replicas and call.read and call.asking is None:
            slot = key_slot(call.key)
            slot_map = self.state.slot_map
            for other in (*slot_map.replicas[slot], slot_map.primaries[slot]):
                if other is not None and other != node and self.state.breakers(other).state == CLOSED:
                    return other
            return None
        return self.state.fallback_replica(call, node)

    def _target(self, call: Call) -> tuple[NodeAddress, Breaker]:
        """The node to send `call` to now, and its breaker. Raises when no node may take it."""
        node = self._route(call)
        if node is None:
            raise NoNodeReachableError(f"no node serves the slot of {call.key[:60]!r}")
        breaker = self.state.breakers(node)
        if breaker.allow():
            return node, breaker
        error = self._unavailable(breaker)
        other = self._substitute(call, node)
        if other is not None:
            other_breaker = self.state.breakers(other)
            if other_breaker.allow():
                return other, other_breaker
        self.state.repair.note_unsynced(call, node)
        raise error

    # -- what a reply or a failure means ----------------------------------------------------------------
    def _after_reply_error(
        self, call: Call, node: NodeAddress, breaker: Breaker, error: ResponseError
    ) -> None:
        """The node answered with an error that is not a redirect: always the caller's."""
        breaker.success()
        if is_outage(error):
            # OOM, CLUSTERDOWN, TRYAGAIN or READONLY (a write that reached a demoted primary): the slot map
            # may be stale, and a write the failure policy drops leaves an older value to repair.
            self.state.refresh_wanted = True
            self.state.repair.note_unsynced(call, node)

    def _after_outage(
        self, call: Call, node: NodeAddress, breaker: Breaker, error: BaseException, retries: int
    ) -> bool:
        """The connection to `node` failed while running `call`: send it again (True) or raise."""
        self.state.refresh_wanted = True
        opened = isinstance(error, BREAKER_ERRORS) and breaker.failure(error)
        self._refresh_in_background()
        # Sent again only after a dropped connection (an idle socket the server closed), never after a
        # timeout: a hung node would make the caller wait twice.
        again = (
            retries > 0
            and call.idempotent
            and not opened
            and breaker.state == CLOSED
            and not isinstance(error, TIMEOUT_ERRORS)
        )
        if not again:
            self.state.repair.note_unsynced(call, node)
        return again

    def _batch_plan(
        self, calls: list[Call], positions: list[int], results: list[Any]
    ) -> list[tuple[NodeAddress, Breaker, list[int]]]:
        """Which node gets which of `calls` in this round; those no node may take get their error now."""
        plan = []
        substitutes: dict[NodeAddress, list[int]] = {}
        for node, indexes in self._group(calls).items():
            if node is None:
                for i in indexes:
                    results[positions[i]] = NoNodeReachableError("slot not served")
                continue
            breaker = self.state.breakers(node)
            if breaker.allow():
                plan.append((node, breaker, indexes))
                continue
            error = self._unavailable(breaker)
            for i in indexes:
                other = self._substitute(calls[i], node)
                if other is None:
                    self.state.repair.note_unsynced(calls[i], node)
                    results[positions[i]] = error
                else:
                    substitutes.setdefault(other, []).append(i)
        for other, indexes in substitutes.items():
            breaker = self.state.breakers(other)
            if breaker.allow():
                plan.append((other, breaker, indexes))
            else:
                for i in indexes:
                    results[positions[i]] = breaker.unavailable()
        return plan

    def _batch_commands(
        self, calls: list[Call], indexes: list[int], node: NodeAddress
    ) -> tuple[list[tuple], list | None]:
        """`node`'s commands; and, when any call sends more than its own command, how many each sends
        and whether it repairs its key (None: one command per call, the common case)."""
        state = self.state
        if (
            not state.repair.pending
            and not state.repair.unsynced
            and not any(calls[i].asking is not None for i in indexes)
        ):
            return [calls[i].args for i in indexes], None
        commands: list[tuple] = []
        layout = []
        for i in indexes:
            sent, repairing = self._commands(calls[i], node)
            commands.extend(sent)
            layout.append((len(sent), repairing))
        return commands, layout

    def _batch_failed(
        self,
        calls: list[Call],
        indexes: list[int],
        positions: list[int],
        results: list[Any],
        node: NodeAddress,
        breaker: Breaker,
        error: BaseException,
    ) -> None:
        """A node's connection failed mid-batch: its calls without a reply yet get the error."""
        self.state.refresh_wanted = True
        if isinstance(error, BREAKER_ERRORS):
            breaker.failure(error)
        for i in indexes:
            if results[positions[i]] is None:
                results[positions[i]] = error
                self.state.repair.note_unsynced(calls[i], node)

    def _batch_replies(
        self,
        calls: list[Call],
        indexes: list[int],
        layout: list | None,
        node: NodeAddress,
        positions: list[int],
        results: list[Any],
        replies: list,
        redo: list,
    ) -> None:
        """Place one node's replies; MOVED/ASK replies go to `redo` for the next round."""
        state = self.state
        if layout is None:
            acked = []
            for i, reply in zip(indexes, replies, strict=True):
                if isinstance(reply, ResponseError):  # one test for the common case, a plain reply
                    if isinstance(reply, REDIRECT_ERRORS):
                        redo.append((positions[i], reply, node))
                        continue
                    reply = refused(reply, calls[i].args, calls[i].key)
                results[positions[i]] = reply
                if calls[i].repairable:
                    if not isinstance(reply, Exception):
                        acked.append(calls[i])
                    elif is_outage(reply):
                        state.repair.note_unsynced(calls[i], node)
            if acked:
                state.repair.acked(node, acked)
            return
        start = 0
        for i, (count, repairing) in zip(indexes, layout, strict=True):
            own = replies[start : start + count]
            start += count
            # ASKING's +OK and a repair DEL's count come first; the first error among them is the reply.
            reply = next((r for r in own if isinstance(r, Exception)), own[-1])
            if isinstance(reply, REDIRECT_ERRORS):
                redo.append((positions[i], reply, node))
                continue
            if isinstance(reply, ResponseError):
                reply = refused(reply, calls[i].args, calls[i].key)
            results[positions[i]] = reply
            if isinstance(reply, Exception):
                if is_outage(reply):
                    state.repair.note_unsynced(calls[i], node)
                continue
            if calls[i].repairable or repairing:
                state.repair.acked(node, (calls[i],), repairing)

    def _next_round(self, calls: list[Call], redo: list) -> list[int]:
        """After a round: the redirected calls, aimed at their new nodes."""
        for index, error, node in redo:
            calls[index] = self.state.redirect(error, calls[index], node)
        if self.state.refresh_wanted:
            self._refresh_in_background()
        return [index for index, _, _ in redo]

    # -- the slot map -----------------------------------------------------------------------------------
    def _refresh_steps(self) -> Generator[NodeAddress, Any, None]:
        """Ask nodes for CLUSTER SLOTS in turn (the driver sends to each node yielded, and sends back its
        reply or throws its error) until one gives a map that serves slots."""
        state = self.state
        errors = []
        for node in state.nodes_to_ask():
            breaker = state.breakers(node)
            if not breaker.allow():
                errors.append(f"{node}: circuit open")
                continue
            try:
                reply = yield node
            except ResponseError as error:
                breaker.success()
                _check_cluster_reply(error, node)
                errors.append(f"{node}: {error}")
                continue
            except OUTAGE_ERRORS as error:
                breaker.failure(error)
                errors.append(f"{node}: {error}")
                continue
            breaker.success()
            slot_map = SlotMap.from_cluster_slots(reply, node)
            if slot_map.covered == 0:
                errors.append(f"{node}: no slots assigned")
                continue
            state.install(slot_map)
            return
        state.last_refresh = time.monotonic()
        raise NoNodeReachableError("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

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
        readonly = self._readonly(node)
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
            steps, reply, error = self._refresh_steps(), None, None
            while True:
                try:
                    node = steps.send(reply) if error is None else steps.throw(error)
                except StopIteration:
                    break
                reply = error = None
                try:
                    reply = self.node_execute(node, "CLUSTER", "SLOTS")
                except (ResponseError, *OUTAGE_ERRORS) as caught:
                    error = caught
        if state.repair.wanted:  # the new map names nodes that lost keys: repair now, not at the next call
            self.repair_in_background()

    def ensure_map(self) -> None:
        state = self.state
        if state.slot_map is None:
            self.refresh(force=True)
        elif state.wants_refresh():
            self._refresh_in_background()
        if state.repair.due_now():
            self.repair_in_background()

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

    # -- commands ---------------------------------------------------------------------------------------
    def execute(self, call: Call) -> Any:
        """Run one call; follows redirects, retries a dropped connection, raises errors as they are."""
        self.ensure_map()
        retries = self.settings.retries
        for _ in range(MAX_REDIRECTS + retries + 1):
            node, breaker = self._target(call)
            commands, repairing = self._commands(call, node)
            pool = self._pool(node)
            connection = pool.get()
            try:
                connection.send_packed_command(self._pack(connection, commands), check_health=False)
                if len(commands) == 1:
                    result = connection.read_response()
                else:
                    result = self._last_reply(_read_replies(connection, len(commands)))
            except REDIRECT_ERRORS as error:
                pool.put(connection)
                breaker.success()
                call = self.state.redirect(error, call, node)
                continue
            except ResponseError as error:
                pool.put(connection)
                self._after_reply_error(call, node, breaker, error)
                raise refused(error, call.args, call.key)  # noqa: B904 - the reply is its cause
            except OUTAGE_ERRORS as error:
                connection.disconnect()
                if not self._after_outage(call, node, breaker, error, retries):
                    raise
                retries -= 1
                continue
            pool.put(connection)
            breaker.success()
            if call.repairable or repairing:
                self.state.repair.acked(node, (call,), repairing)
            return result
        raise NoNodeReachableError(f"too many redirects for {call.key[:60]!r}")

    def execute_batch(self, calls: list[Call]) -> list[Any]:
        """Run many calls, one pipelined write per node, all writes before any read (in slices of
        BATCH_SLICE calls)."""
        if len(calls) <= BATCH_SLICE:
            return self._execute_slice(calls)
        results: list[Any] = []
        for start in range(0, len(calls), BATCH_SLICE):
            results += self._execute_slice(calls[start : start + BATCH_SLICE])
        return results

    def _execute_slice(self, calls: list[Call]) -> list[Any]:
        if not calls:
            return []
        self.ensure_map()
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(MAX_REDIRECTS + 1):
            redo = self._batch_round([calls[i] for i in pending], pending, results)
            if not redo:
                return results
            pending = self._next_round(calls, redo)
        for index in pending:
            results[index] = NoNodeReachableError("too many redirects")
        return results

    def _batch_round(self, calls: list[Call], positions: list[int], results: list[Any]) -> list:
        sent = []
        for node, breaker, indexes in self._batch_plan(calls, positions, results):
            commands, layout = self._batch_commands(calls, indexes, node)
            pool = self._pool(node)
            connection = pool.get()
            try:
                connection.send_packed_command(self._pack(connection, commands), check_health=False)
            except OUTAGE_ERRORS as error:
                connection.disconnect()
                self._batch_failed(calls, indexes, positions, results, node, breaker, error)
                continue
            sent.append((node, breaker, indexes, pool, connection, len(commands), layout))
        redo: list = []
        for node, breaker, indexes, pool, connection, count, layout in sent:
            try:
                replies = _read_replies(connection, count)
            except OUTAGE_ERRORS as error:
                connection.disconnect()
                self._batch_failed(calls, indexes, positions, results, node, breaker, error)
                continue
            pool.put(connection)
            breaker.success()
            self._batch_replies(calls, indexes, layout, node, positions, results, replies, redo)
        if self.state.refresh_wanted:
            self._refresh_in_background()
        return redo

    # -- node-wide work (purges, checks) -----------------------------------------------------------------
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
    """Idle connections to one node, for one event loop.

    A burst of calls on an empty pool opens at most `opening_limit` connections at a time; the other callers
    wait for one of those, or for a connection put back, and then use it. That wait is not charged to
    SOCKET_CONNECT_TIMEOUT, which bounds only the open itself: 200 `aget`s started together on a busy loop
    used to open 200 connections at once, and the loop served some of them later than the 0.2-s timeout,
    so a healthy node's reads missed and its breaker opened. A caller that has waited and finds the node's
    breaker open fails at once with `NodeUnavailableError`, as it would have before sending.
    """

    def __init__(self, connection_class: type, kwargs: dict[str, Any], opening_limit: int) -> None:
        self.connection_class = connection_class
        self.kwargs = kwargs
        self.opening_limit = opening_limit
        self.opening = 0
        self.idle: collections.deque = collections.deque()
        self.waiters: collections.deque[asyncio.Future] = collections.deque()

    async def get(self, breaker: Breaker) -> redis.asyncio.Connection:
        """An idle connection, else a newly opened one (connected: open errors are raised here)."""
        waited = False
        while True:
            if self.idle:
                return self.idle.pop()
            if waited and breaker.state == OPEN:
                self._wake()  # pass the turn on: the next waiter fails at once too, or finds a connection
                raise breaker.unavailable()
            if self.opening < self.opening_limit:
                return await self._open()
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if not waiter.done():
                    waiter.cancel()
                elif not waiter.cancelled():
                    self._wake()  # woken, then cancelled before using the turn: pass it on
                raise
            waited = True

    async def _open(self) -> redis.asyncio.Connection:
        self.opening += 1
        connection = self.connection_class(**self.kwargs)
        try:
            await connection.connect()
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            self.opening -= 1
            self._wake()
        return connection

    def _wake(self) -> None:
        """Let the longest-waiting caller look again (an idle connection or a free opening turn)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def put(self, connection: redis.asyncio.Connection) -> None:
        if len(self.idle) < MAX_IDLE_CONNECTIONS:
            self.idle.append(connection)
        else:
            asyncio.ensure_future(connection.disconnect())
        self._wake()

    async def close(self) -> None:
        while self.idle:
            await self.idle.pop().disconnect()


async def _async_read_replies(connection: redis.asyncio.Connection, count: int) -> list[Any]:
    """As _read_replies, with the asyncio connection: error replies as exception objects."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await connection.read_response())
        except ResponseError as error:
            replies.append(error)
    return replies


class AsyncClusterTopology(_TopologyCommon):
    """The same routing and decisions with redis-py's asyncio connections; one instance per event loop."""

    connection_module = redis.asyncio

    def __init__(self, state: TopologyState) -> None:
        super().__init__(state)
        self._refresh_task: asyncio.Task | None = None
        self._repairer: ClusterTopology | None = None

    def _pool(self, node: NodeAddress) -> _AsyncNodePool:
        readonly = self._readonly(node)
        pool = self._pools.get((node, readonly))
        if pool is None:
            opening_limit = max(MAX_OPENING_CONNECTIONS, self.settings.breaker_threshold)
            pool = self._pools[(node, readonly)] = _AsyncNodePool(
                *self._pool_args(node, readonly), opening_limit
            )
        return pool

    async def refresh(self, force: bool = False) -> None:
        state = self.state
        if not force and state.slot_map is not None and not state.refresh_due():
            return
        steps, reply, error = self._refresh_steps(), None, None
        while True:
            try:
                node = steps.send(reply) if error is None else steps.throw(error)
            except StopIteration:
                break
            reply = error = None
            try:
                reply = await self._node_execute(node, "CLUSTER", "SLOTS")
            except (ResponseError, *OUTAGE_ERRORS) as caught:
                error = caught
        if state.repair.wanted:
            self._repair_in_background()

    async def _node_execute(self, node: NodeAddress, *args: Any) -> Any:
        pool = self._pool(node)
        connection = await pool.get(self.state.breakers(node))
        try:
            await connection.send_command(*args)
            result = await connection.read_response()
        except ResponseError as error:
            pool.put(connection)
            raise refused(error, args)  # noqa: B904 - the reply is its cause
        except BaseException:
            await connection.disconnect()
            raise
        pool.put(connection)
        return result

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

    async def execute(self, call: Call) -> Any:
        await self.ensure_map()
        retries = self.settings.retries
        for _ in range(MAX_REDIRECTS + retries + 1):
            node, breaker = self._target(call)
            commands, repairing = self._commands(call, node)
            pool = self._pool(node)
            connection = None
            try:
                connection = await pool.get(breaker)
                await connection.send_packed_command(self._pack(connection, commands), check_health=False)
                if len(commands) == 1:
                    result = await connection.read_response()
                else:
                    result = self._last_reply(await _async_read_replies(connection, len(commands)))
            except REDIRECT_ERRORS as error:
                pool.put(connection)
                breaker.success()
                call = self.state.redirect(error, call, node)
                continue
            except ResponseError as error:
                pool.put(connection)
                self._after_reply_error(call, node, breaker, error)
                raise refused(error, call.args, call.key)  # noqa: B904 - the reply is its cause
            except OUTAGE_ERRORS as error:
                if connection is not None:
                    await connection.disconnect()
                if not self._after_outage(call, node, breaker, error, retries):
                    raise
                retries -= 1
                continue
            except BaseException:
                # Cancelled mid-command: the reply may still arrive, so this connection is unusable.
                if connection is not None:
                    await connection.disconnect()
                raise
            pool.put(connection)
            breaker.success()
            if call.repairable or repairing:
                self.state.repair.acked(node, (call,), repairing)
            return result
        raise NoNodeReachableError(f"too many redirects for {call.key[:60]!r}")

    async def execute_batch(self, calls: list[Call]) -> list[Any]:
        if len(calls) <= BATCH_SLICE:
            return await self._execute_slice(calls)
        results: list[Any] = []
        for start in range(0, len(calls), BATCH_SLICE):
            results += await self._execute_slice(calls[start : start + BATCH_SLICE])
        return results

    async def _execute_slice(self, calls: list[Call]) -> list[Any]:
        if not calls:
            return []
        await self.ensure_map()
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(MAX_REDIRECTS + 1):
            redo = await self._batch_round([calls[i] for i in pending], pending, results)
            if not redo:
                return results
            pending = self._next_round(calls, redo)
        for index in pending:
            results[index] = NoNodeReachableError("too many redirects")
        return results

    async def _batch_round(self, calls: list[Call], positions: list[int], results: list[Any]) -> list:
        sent = []
        try:
            for node, breaker, indexes in self._batch_plan(calls, positions, results):
                commands, layout = self._batch_commands(calls, indexes, node)
                pool = self._pool(node)
                connection = None
                try:
                    connection = await pool.get(breaker)
                    await connection.send_packed_command(self._pack(connection, commands), check_health=False)
                except OUTAGE_ERRORS as error:
                    if connection is not None:
                        await connection.disconnect()
                    self._batch_failed(calls, indexes, positions, results, node, breaker, error)
                    continue
                except BaseException:
                    if connection is not None:  # cancelled while sending: this connection is unusable
                        await connection.disconnect()
                    raise
                sent.append((node, breaker, indexes, pool, connection, len(commands), layout))
            redo: list = []
            while sent:
                node, breaker, indexes, pool, connection, count, layout = sent[0]
                try:
                    replies = await _async_read_replies(connection, count)
                except OUTAGE_ERRORS as error:
                    sent.pop(0)
                    await connection.disconnect()
                    self._batch_failed(calls, indexes, positions, results, node, breaker, error)
                    continue
                sent.pop(0)
                pool.put(connection)
                breaker.success()
                self._batch_replies(calls, indexes, layout, node, positions, results, replies, redo)
            if self.state.refresh_wanted:
                self._refresh_in_background()
            return redo
        except BaseException:
            # Cancelled mid-batch: replies may still arrive on the connections not read yet.
            for _, _, _, _, connection, _, _ in sent:
                await connection.disconnect()
            raise

    async def client_for(self, key: bytes) -> redis.asyncio.Redis:
        await self.ensure_map()
        return self._client_for(key, redis.asyncio.Redis)

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()


__all__ = ["AsyncClusterTopology", "ClusterTopology"]
