"""Every decision around a command, written once: which node, breaker, replica, redirect, retry, repair.

ClusterTopology and AsyncClusterTopology (cluster.py) only move bytes, over blocking or asyncio connections;
what they send where, and what a reply or a failure means, is decided here, so the sync and async paths
cannot drift apart.

- One call (the hot path): the drivers' loop asks `attempt` where to send it, sends, and hands the outcome
  to `succeeded` or `failed` (redirect, send again, or raise).
- A batch and the slot map reload are generators of I/O steps (sans-I/O), run by `drive` or `drive_async`:
  the generator yields what to send where and receives the reply, or has the I/O error thrown in.
  `slice_steps` yields a `Send` per node (one packed write; the driver answers with a handle), then a
  `Read` per handle (the replies, error replies as exception objects): every node is written before any
  is read. `refresh_steps` yields a node: the driver answers with its CLUSTER SLOTS reply.
"""

from __future__ import annotations

import time
from binascii import crc_hqx
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.crc import key_slot
from redis.exceptions import AskError, ResponseError

from ..conf import ConnectionSettings, NodeAddress
from .base import (
    BREAKER_ERRORS,
    MAX_REDIRECTS,
    OUTAGE_ERRORS,
    REDIRECT_ERRORS,
    SLOT_COUNT,
    TIMEOUT_ERRORS,
    Call,
    NoNodeReachableError,
    NotAClusterError,
    PermissionRefusedError,
    SlotMap,
    TopologyState,
    group_by_node,
    is_outage,
    refused,
)
from .breaker import CLOSED, Breaker, NodeUnavailableError

Command = tuple[Any, ...]
# A call to send again in the next batch round: its index in the slice, the redirect (MOVED/ASK), or None
# for a call whose connection dropped (sent again as it is), and the node that sent it.
Redirected = tuple[int, AskError | None, NodeAddress]
# Per call of a node's batch, when some send more than their own command: how many commands it sent, and
# whether the first of them deletes its key (a repair). None: one command per call, the common case.
Layout = list[tuple[int, bool]] | None

# The errors a driver throws into the steps; anything else ends the operation as it is.
IO_ERRORS: tuple[type[BaseException], ...] = (ResponseError, *OUTAGE_ERRORS)

Step = TypeVar("Step")
Result = TypeVar("Result")


@dataclass(slots=True)
class Send:
    """Write `commands` to `node` in one packed write; the driver answers with a handle for the `Read`."""

    node: NodeAddress
    breaker: Breaker
    commands: list[Command]


@dataclass(slots=True)
class Read:
    """Read `count` replies from what a `Send` answered (error replies as exception objects)."""

    handle: Any
    count: int


def drive(steps: Generator[Step, Any, Result], io: Callable[[Step], Any]) -> Result:
    """Run `steps` with blocking I/O: `io` does one step; its reply is sent back, its I/O error thrown in."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(reply) if error is None else steps.throw(error)
        except StopIteration as done:
            result: Result = done.value
            return result
        try:
            reply, error = io(step), None
        except IO_ERRORS as caught:
            reply, error = None, caught


async def drive_async(steps: Generator[Step, Any, Result], io: Callable[[Step], Awaitable[Any]]) -> Result:
    """`drive` for asyncio: the same steps, `io` awaited."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(reply) if error is None else steps.throw(error)
        except StopIteration as done:
            result: Result = done.value
            return result
        try:
            reply, error = await io(step), None
        except IO_ERRORS as caught:
            reply, error = None, caught


def _first_report(error: BaseException) -> bool:
    """Whether `error` is the first report of its cause: the callers that shared one async connection
    (multiplex.py) all fail when it does, and that is one failure of the node, not one per caller."""
    origin = getattr(error, "shared_failure", None)
    if origin is None:
        return True
    if getattr(origin, "counted", False):
        return False
    origin.counted = True
    return True


def too_many_redirects(call: Call) -> NoNodeReachableError:
    return NoNodeReachableError(f"too many redirects for {call.key[:60]!r}")


def _check_cluster_reply(error: ResponseError, node: NodeAddress) -> None:
    if isinstance(error, PermissionRefusedError):
        raise error  # the user may not read the slot map: every node will say so, and it is no outage
    if "cluster support disabled" in str(error).lower():
        raise NotAClusterError(
            f"{node} is a Redis server without cluster mode; LOCATION must name Redis Cluster nodes"
        ) from error


class ClusterSteps:
    """The decisions of the cluster topologies. A subclass supplies the I/O and `_refresh_in_background`
    (a thread for the sync topology, a task on the loop for the async one)."""

    def __init__(self, state: TopologyState) -> None:
        self.state = state
        self.settings: ConnectionSettings = state.settings

    def _refresh_in_background(self) -> None:  # pragma: no cover - both subclasses define it
        raise NotImplementedError

    def primaries(self) -> list[NodeAddress]:
        slot_map = self.state.slot_map
        return list(slot_map.primary_nodes) if slot_map else []

    # -- one call -------------------------------------------------------------------------------------------
    # The hot path (one GET) is not a generator: one costs about a microsecond per call, a quarter of the
    # topology's own CPU time for a GET. The drivers' loops are a few lines over these three decisions.
    def attempt(self, call: Call) -> tuple[NodeAddress, Breaker, list[Command], bool]:
        """Where to send `call` now, its breaker, the commands to send, and whether they start with a repair
        DEL. Raises when no node may take it."""
        node, breaker = self._target(call)
        commands, repairing = self._commands(call, node)
        return node, breaker, commands, repairing

    def succeeded(self, call: Call, node: NodeAddress, breaker: Breaker, repairing: bool) -> None:
        breaker.success()
        if call.repairable or repairing:
            self.state.repair.acked(node, (call,), repairing)

    def failed(
        self, call: Call, node: NodeAddress, breaker: Breaker, error: BaseException, retries: int
    ) -> tuple[Call, int]:
        """Sending `call` to `node` raised `error` (an error reply, or the connection failed): the call to
        send next (redirected, or sent again after a dropped connection) and the retries left; or raises
        what the caller gets (an error reply as it is, an outage for the failure policy above)."""
        if isinstance(error, REDIRECT_ERRORS):
            breaker.success()
            return self.state.redirect(error, call, node), retries
        state = self.state
        if isinstance(error, ResponseError):  # the node answered: it is up
            breaker.success()
            if is_outage(error):
                # OOM, CLUSTERDOWN, TRYAGAIN or READONLY (a write that reached a demoted primary): the slot
                # map may be stale, and a write the failure policy drops leaves an older value to repair.
                state.refresh_wanted = True
                state.repair.note_unsynced(call, node)
            raise refused(error, call.args, call.key)
        state.refresh_wanted = True
        self._refresh_in_background()
        # Sent again only after a dropped connection (an idle socket the server closed), never after a
        # timeout: a hung node would make the caller wait twice. A drop that is sent again is not counted
        # against the node: after a restart every thread may find its pooled connection dead, and the
        # attempt on a new connection is what says whether the node is there.
        again = (
            retries > 0
            and call.idempotent
            and breaker.state == CLOSED
            and not isinstance(error, TIMEOUT_ERRORS)
        )
        if again:
            return call, retries - 1
        if isinstance(error, BREAKER_ERRORS) and _first_report(error):
            breaker.failure(error)
        state.repair.note_unsynced(call, node)
        raise error

    # -- routing --------------------------------------------------------------------------------------------
    def _route(self, call: Call) -> NodeAddress | None:
        if call.asking is not None:
            return call.asking
        slot_map = self.state.slot_map
        if slot_map is None:
            return None
        pending = self.state.repair.pending
        if call.read and pending and call.key in pending:
            return slot_map.primaries[key_slot(call.key)]  # a replica could not delete it first
        return slot_map.node_for(call.key, call.read, self.settings.read_from_replicas)

    def _group(self, calls: list[Call]) -> dict[NodeAddress | None, list[int]]:
        """Indexes of `calls` per target node; the common case (primaries, no ASK) in one tight loop."""
        slot_map = self.state.slot_map
        if slot_map is None or self.settings.read_from_replicas:
            return group_by_node(calls, self._route)
        primaries = slot_map.primaries
        # Grouped by the identity of the slot map's node objects (NodeAddress hashes in Python, a
        # microsecond per call), then merged by equality: a node whose slots came in several ranges, or an
        # ASK target, may be more than one object.
        by_object: dict[int, list[int]] = {}
        nodes: dict[int, NodeAddress | None] = {}
        for index, call in enumerate(calls):
            key = call.key
            start = key.find(b"{")  # redis.crc.key_slot, inlined
            if start > -1:
                end = key.find(b"}", start + 1)
                if end > -1 and end != start + 1:
                    key = key[start + 1 : end]
            node = call.asking or primaries[crc_hqx(key, 0) % SLOT_COUNT]
            group = by_object.get(id(node))
            if group is None:
                by_object[id(node)] = [index]
                nodes[id(node)] = node
            else:
                group.append(index)
        groups: dict[NodeAddress | None, list[int]] = {}
        for identity, indexes in by_object.items():
            node = nodes[identity]
            merged = groups.get(node)
            if merged is None:
                groups[node] = indexes
            else:  # in call order: two calls of one key must reach the node in the order they were made
                groups[node] = sorted(merged + indexes)
        return groups

    def _readonly(self, node: NodeAddress) -> bool:
        """Connections to a replica send READONLY first, so that it serves reads of its slots."""
        settings = self.settings
        if not (settings.read_from_replicas or settings.replica_fallback):
            return False
        slot_map = self.state.slot_map
        return slot_map is not None and node in slot_map.replica_nodes and node not in slot_map.primary_nodes

    def _unavailable(self, breaker: Breaker) -> NodeUnavailableError:
        """A call may not go to `breaker`'s node: a promoted replica may already serve its slots."""
        self.state.refresh_wanted = True
        self._refresh_in_background()
        return breaker.unavailable()

    def _substitute(self, call: Call, node: NodeAddress) -> NodeAddress | None:
        """Another node that may serve the read `call` while `node` is unavailable, or None."""
        slot_map = self.state.slot_map
        if self.settings.read_from_replicas and call.read and call.asking is None and slot_map is not None:
            slot = key_slot(call.key)
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

    def _commands(self, call: Call, node: NodeAddress) -> tuple[list[Command], bool]:
        """What to send for `call` to `node`, and whether that starts with a repair: ASKING before a command
        for a slot being imported; DEL of the key first when its value may be older than this process
        wrote."""
        repair = self.state.repair
        repairing = bool(repair.pending or repair.unsynced) and repair.due(call, node)
        if not repairing:
            return ([("ASKING",), call.args] if call.asking is not None else [call.args]), False
        if call.asking is not None:
            return [("ASKING",), ("DEL", call.key), ("ASKING",), call.args], True
        return [("DEL", call.key), call.args], True

    # -- many calls -----------------------------------------------------------------------------------------
    def slice_steps(self, calls: list[Call]) -> Generator[Send | Read, Any, list[Any]]:
        """Run `calls` (one slice of a batch, a list of its own: redirects replace its items) in rounds: each
        round writes every node's calls before reading any reply; redirected calls go in the next round.
        One result per call, in order, an exception object for a call that failed."""
        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        retries = self.settings.retries
        for _ in range(MAX_REDIRECTS + retries + 1):
            redo = yield from self.round_steps([calls[i] for i in pending], pending, results, retries > 0)
            if not redo:
                return results
            for index, error, node in redo:
                if error is not None:
                    calls[index] = self.state.redirect(error, calls[index], node)
            if any(error is None for _, error, _ in redo):
                retries -= 1
            if self.state.refresh_wanted:
                self._refresh_in_background()
            pending = [index for index, _, _ in redo]
        for index in pending:
            results[index] = NoNodeReachableError("too many redirects")
        return results

    def round_steps(
        self, calls: list[Call], positions: list[int], results: list[Any], may_resend: bool = False
    ) -> Generator[Send | Read, Any, list[Redirected]]:
        """One round: `calls[i]`'s result goes to `results[positions[i]]`; returns the calls to send again
        (redirected; or, when `may_resend`, idempotent calls whose connection dropped)."""
        sent: list[tuple[NodeAddress, Breaker, list[int], Any, int, Layout]] = []
        redo: list[Redirected] = []
        for node, breaker, indexes in self._batch_plan(calls, positions, results):
            commands, layout = self._batch_commands(calls, indexes, node)
            try:
                handle = yield Send(node, breaker, commands)
            except OUTAGE_ERRORS as error:
                self._batch_failed(calls, indexes, positions, results, node, breaker, error, may_resend, redo)
                continue
            sent.append((node, breaker, indexes, handle, len(commands), layout))
        for node, breaker, indexes, handle, count, layout in sent:
            try:
                replies = yield Read(handle, count)
            except OUTAGE_ERRORS as error:
                self._batch_failed(calls, indexes, positions, results, node, breaker, error, may_resend, redo)
                continue
            breaker.success()
            if layout is None:
                self._place_replies(calls, indexes, node, positions, results, replies, redo)
            else:
                self._place_layout_replies(calls, indexes, layout, node, positions, results, replies, redo)
        if self.state.refresh_wanted:
            self._refresh_in_background()
        return redo

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
    ) -> tuple[list[Command], Layout]:
        """`node`'s commands, and their layout."""
        repair = self.state.repair
        if (
            not repair.pending
            and not repair.unsynced
            and not any(calls[i].asking is not None for i in indexes)
        ):
            return [calls[i].args for i in indexes], None
        commands: list[Command] = []
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
        may_resend: bool,
        redo: list[Redirected],
    ) -> None:
        """A node's connection failed mid-batch: its calls without a reply yet get the error, or, after a
        dropped connection (as for one call: never after a timeout), the idempotent ones go again in the
        next round, on a new connection."""
        self.state.refresh_wanted = True
        resend = may_resend and breaker.state == CLOSED and not isinstance(error, TIMEOUT_ERRORS)
        failed = False
        for i in indexes:
            if results[positions[i]] is None:
                if resend and calls[i].idempotent:
                    redo.append((positions[i], None, node))
                    continue
                failed = True
                results[positions[i]] = error
                self.state.repair.note_unsynced(calls[i], node)
        if failed and isinstance(error, BREAKER_ERRORS) and _first_report(error):
            breaker.failure(error)

    def _place_replies(
        self,
        calls: list[Call],
        indexes: list[int],
        node: NodeAddress,
        positions: list[int],
        results: list[Any],
        replies: list[Any],
        redo: list[Redirected],
    ) -> None:
        """One reply per call (the common case): placed; MOVED/ASK replies go to `redo`."""
        repair = self.state.repair
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
                    repair.note_unsynced(calls[i], node)
        if acked:
            repair.acked(node, acked)

    def _place_layout_replies(
        self,
        calls: list[Call],
        indexes: list[int],
        layout: list[tuple[int, bool]],
        node: NodeAddress,
        positions: list[int],
        results: list[Any],
        replies: list[Any],
        redo: list[Redirected],
    ) -> None:
        """As `_place_replies`, when some calls sent ASKING or a repair DEL before their own command."""
        repair = self.state.repair
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
                    repair.note_unsynced(calls[i], node)
                continue
            if calls[i].repairable or repairing:
                repair.acked(node, (calls[i],), repairing)

    # -- the slot map ---------------------------------------------------------------------------------------
    def refresh_steps(self) -> Generator[NodeAddress, Any, None]:
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
