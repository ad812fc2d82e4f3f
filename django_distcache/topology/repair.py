"""Failover repair: the keys a process deletes rather than let an older copy of them be served.

Replication is asynchronous: a primary that fails may not have passed its last writes on to the replica
that takes over, and a write this process could not make leaves the old value where it was. For writes
whose deletion can only make reads miss (`Call.repairable`: cache entries and tag versions), this module
remembers which keys may now be older than this process wrote, per primary, and queues them to be deleted
on their slot's primary: before this process touches them again, and in the background (docs/failure.md).
Pure bookkeeping: the topology sends the deletes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from redis.crc import key_slot

from ..conf import NodeAddress
from ..forksafe import renew_locks_after_fork
from .breaker import CLOSED

if TYPE_CHECKING:
    from .base import Call, TopologyState

logger = logging.getLogger("django_distcache.topology")

# Writes a process may fail to make on one unreachable primary and still keep fallback reads of it and
# repair them; also the most acknowledged writes per primary it keeps in mind for FAILOVER_REPAIR_WINDOW.
MAX_UNSYNCED_KEYS = 10_000


class FailoverRepair:
    """What may be older than this process wrote, and what is queued for deletion. One per cluster, shared
    by the sync and async topologies; the breakers report nodes failing and coming back."""

    def __init__(self, state: TopologyState) -> None:
        self.state = state
        # Per primary whose breaker is not closed: the keys whose copy on its replicas (or on itself) may be
        # older than this process's last write of them: writes it could not make there, and writes
        # acknowledged in the FAILOVER_REPAIR_WINDOW before the breaker opened. Fallback reads of them miss.
        # When the node answers again or stops being a primary, they move to `pending`. `None`: too many to
        # track.
        self.unsynced: dict[NodeAddress, set[bytes] | None] = {}
        # Per primary: (time, key) of its acknowledged repairable writes, the last FAILOVER_REPAIR_WINDOW
        # seconds of them (counted back from the newest), MAX_UNSYNCED_KEYS at most.
        self.recent: dict[NodeAddress, deque[tuple[float, bytes]]] = {}
        # Per primary: when the newest write dropped from `recent` for room was acknowledged.
        self.recent_overflowed: dict[NodeAddress, float] = {}
        # Keys to delete on their slot's primary before this process touches them again, and in the
        # background (`wanted`): their value there may be older than this process's last write.
        self.pending: set[bytes] = set()
        self.wanted = False
        self.after = 0.0  # a failed background repair is tried again after this time
        self.running = threading.Lock()  # held by the one background repair thread
        # Guards `unsynced` against a map installed while a failed write is being held for its old node.
        self.held_lock = threading.Lock()
        self.repaired = 0  # keys deleted by the repair, for stats and tests
        self.untracked = 0  # times keys to repair were too many to know (logged)
        renew_locks_after_fork(self, "running", "held_lock")

    # -- what the router asks -------------------------------------------------------------------------------
    def may_be_older_on_replicas(self, key: bytes, primary: NodeAddress) -> bool:
        """May a replica of `primary` hold an older `key` than this process wrote? (Then it may not serve it.)"""
        if key in self.pending:
            return True
        if primary not in self.unsynced:
            return False
        held = self.unsynced[primary]
        return held is None or key in held

    def due(self, call: Call, node: NodeAddress) -> bool:
        """Must `call`'s key be deleted on `node` before `call` runs? Yes if it is queued for repair, or held
        for `node` (the call that probes a node coming back must not read what it holds). Not when `call`
        deletes it itself."""
        if call.args == ("DEL", call.key):
            return False
        if call.key in self.pending:
            return True
        held = self.unsynced.get(node)
        return held is not None and call.key in held

    def due_now(self) -> bool:
        """Should a background repair start now (one is wanted, and no failed one is waiting to retry)?"""
        return self.wanted and time.monotonic() >= self.after

    # -- what the topology reports --------------------------------------------------------------------------
    def acked(self, node: NodeAddress, calls: Sequence[Call], repaired: bool = False) -> None:
        """`node` acknowledged `calls`: repairable writes, or (`repaired`) calls sent right after a repair
        DEL of their key. Kept in mind for the repair window; a DEL of a queued key is its repair."""
        if repaired or self.pending or self.unsynced:
            for call in calls:
                if repaired or call.args == ("DEL", call.key):
                    self.done(call.key, node)
        window = self.state.settings.repair_window
        if window <= 0:
            return
        now = time.monotonic()
        recent = self.recent.get(node)
        if recent is None:
            recent = self.recent.setdefault(node, deque())
        recent.extend((now, call.key) for call in calls)
        cutoff = now - window
        try:
            while recent[0][0] < cutoff:
                recent.popleft()
            while len(recent) > MAX_UNSYNCED_KEYS:
                self.recent_overflowed[node] = recent.popleft()[0]
        except IndexError:  # another thread emptied it meanwhile
            pass

    def note_unsynced(self, call: Call, node: NodeAddress) -> None:
        """`call` could not reach `node` (or its reply was lost): if it wrote an entry, that entry may now
        be older than the caller meant, there or on the replicas: delete it before it is read again."""
        if not call.repairable or call.asking is not None:
            return
        state = self.state
        with self.held_lock:
            slot_map = state.slot_map
            if (
                slot_map is None
                or slot_map.primaries[key_slot(call.key)] != node
                or state.breakers(node).state == CLOSED
            ):
                # The node is up (a lost reply) or no longer the key's: repair at once where the slot is.
                self.pending.add(call.key)
                self.wanted = True
                return
            keys = self.unsynced.setdefault(node, set())
            if keys is not None:
                keys.add(call.key)
                if len(keys) > MAX_UNSYNCED_KEYS:
                    self.unsynced[node] = None

    def done(self, key: bytes, node: NodeAddress | None = None) -> None:
        """`key` was deleted on `node`, the primary of its slot."""
        held = self.unsynced.get(node) if node is not None else None
        if held:
            held.discard(key)
        if key in self.pending:
            self.pending.discard(key)
            self.repaired += 1

    def retry_later(self) -> None:
        """Some keys could not be deleted now: try again a breaker cooldown later."""
        self.wanted = True
        self.after = time.monotonic() + self.state.settings.breaker_cooldown

    # -- what the breakers and the slot map report ----------------------------------------------------------
    def node_failed(self, node: object) -> None:
        """`node`'s breaker opened: its replicas may lack the writes it acknowledged just before."""
        if not isinstance(node, NodeAddress) or self.state.settings.repair_window <= 0:
            return
        keys = self._recent_keys(node, since=time.monotonic())
        with self.held_lock:
            held = self.unsynced.setdefault(node, set())
            if keys is None or held is None:
                self.unsynced[node] = None
            else:
                held |= keys

    def node_back(self, node: object) -> None:
        """`node`'s breaker closed: the keys it could not write (and those written just before it failed)
        are repaired now. It may be a demoted primary that lost the writes: which one is not known here."""
        if isinstance(node, NodeAddress) and node in self.unsynced:
            with self.held_lock:
                keys = self.unsynced.pop(node, set())
            self._queue(node, keys, with_recent=False)

    def nodes_left(self, primaries: Iterable[NodeAddress]) -> None:
        """A new slot map names `primaries`. A node that no longer serves slots (a replica took over, or its
        slots moved): keys this process wrote there lately may be older, or missing, on their slots' new
        primaries, so they are queued before the new map routes any call there. The caller holds
        `held_lock` while it installs the map."""
        serving = set(primaries)
        for node in dict.fromkeys([*self.unsynced, *self.recent]):
            if node not in serving:
                self._queue(node, self.unsynced.pop(node, set()), with_recent=True)

    def slot_left(self, node: NodeAddress, slot: int, target: NodeAddress) -> None:
        """`node` no longer serves `slot` (MOVED to `target`). If a replica took over (a failover this
        process saw nothing of until this reply), keys of that slot this process wrote there lately may be
        older on `target`: queued for repair before the call goes there. Not when `target` is another
        primary (a reshard: keys move with their values), so a reshard costs no scan of the recent writes."""
        held = self.unsynced.get(node)
        recent = self.recent.get(node)
        if not held and not recent:
            return
        slot_map = self.state.slot_map
        if (
            slot_map is not None
            and target in slot_map.primary_nodes
            and target not in slot_map.replicas[slot]
        ):
            return
        keys = {key for key in held or () if key_slot(key) == slot}
        keys.update(key for _, key in list(recent or ()) if key_slot(key) == slot)
        if keys:
            self.pending |= keys
            self.wanted = True

    # -- internals ------------------------------------------------------------------------------------------
    def _recent_keys(self, node: NodeAddress, since: float | None = None) -> set[bytes] | None:
        """Keys acknowledged by `node` in the window (from `since` on, if given); None if too many."""
        recent = self.recent.get(node)
        if not recent:
            return set()
        entries = list(recent)
        cutoff = (since if since is not None else entries[-1][0]) - self.state.settings.repair_window
        if self.recent_overflowed.get(node, cutoff - 1) >= cutoff:
            return None  # some writes of the window were not kept
        return {key for at, key in entries if at >= cutoff}

    def _queue(self, node: NodeAddress, keys: set[bytes] | None, with_recent: bool) -> None:
        if with_recent:
            recent = self._recent_keys(node)
            self.recent.pop(node, None)
            self.recent_overflowed.pop(node, None)
            keys = None if keys is None or recent is None else keys | recent
        if keys is None:
            self.untracked += 1
            logger.warning(
                "node %s: more than %d recent or dropped writes of this process; those it cannot name may "
                "be served at an older value until they expire",
                node,
                MAX_UNSYNCED_KEYS,
            )
            return
        if keys:
            logger.info(
                "node %s: deleting %d keys whose copy may be older than this process wrote", node, len(keys)
            )
            self.pending |= keys
            self.wanted = True
