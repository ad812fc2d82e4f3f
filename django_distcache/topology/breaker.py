"""Per-node circuit breakers: a dead or hung node costs only its own keys.

Each node has a breaker. After BREAKER_THRESHOLD consecutive connection errors or timeouts it *opens*:
calls for that node fail at once with `NodeUnavailableError` (an outage, so the failure policy turns them
into misses and dropped writes) instead of each waiting for a timeout. After BREAKER_COOLDOWN seconds it
lets one call through (*half-open*); that call's success closes it, its failure opens it again. Opening
and closing are each logged once, with the node and the reason; nothing is logged per request.

Pure state, no I/O: the sync and async topologies share one set of breakers per cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from redis.exceptions import ConnectionError as RedisConnectionError

from ..forksafe import renew_locks_after_fork

logger = logging.getLogger("django_distcache.topology")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class NodeUnavailableError(RedisConnectionError):
    """The node's breaker is open: the call was not sent."""


class Breaker:
    __slots__ = (
        "node",
        "threshold",
        "cooldown",
        "state",
        "failures",
        "opened_at",
        "probing",
        "reason",
        "on_open",
        "on_close",
        "_lock",
        "__weakref__",
    )

    def __init__(
        self,
        node: object,
        threshold: int,
        cooldown: float,
        on_close: Callable[[object], None] | None = None,
        on_open: Callable[[object], None] | None = None,
    ) -> None:
        self.node = node
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False
        self.reason = ""
        self.on_close = on_close
        self.on_open = on_open
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")

    def allow(self) -> bool:
        """May a call be sent to the node now? (Half-open: one probe at a time.)"""
        state = self.state
        if state == CLOSED:
            return True
        with self._lock:
            if self.state == OPEN and time.monotonic() - self.opened_at >= self.cooldown:
                self.state = HALF_OPEN
                self.probing = False
            if self.state == HALF_OPEN and not self.probing:
                self.probing = True
                return True
            return self.state == CLOSED

    def success(self) -> None:
        if self.state == CLOSED and not self.failures:
            return
        with self._lock:
            was = self.state
            self.state, self.failures, self.probing = CLOSED, 0, False
        if was != CLOSED:
            logger.warning(
                "node %s is back: circuit closed after %.1fs", self.node, time.monotonic() - self.opened_at
            )
            if self.on_close is not None:
                self.on_close(self.node)

    def failure(self, error: BaseException) -> bool:
        """Record a connection error or timeout; True if this opened the breaker."""
        with self._lock:
            self.failures += 1
            self.probing = False
            if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
                reopened = self.state == HALF_OPEN
                self.state, self.opened_at = OPEN, time.monotonic()
                self.reason = f"{type(error).__name__}: {error}"
                opened = True
            else:
                return False
        if not reopened:
            logger.warning(
                "node %s unavailable (%s): circuit open; its keys follow the failure policy for %.1fs "
                "before one call probes it",
                self.node,
                self.reason,
                self.cooldown,
            )
            if self.on_open is not None:
                self.on_open(self.node)
        return opened

    def unavailable(self) -> NodeUnavailableError:
        return NodeUnavailableError(f"node {self.node} is unavailable (circuit open: {self.reason})")


class Breakers:
    """One breaker per node address, created on first use."""

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        on_close: Callable[[object], None] | None = None,
        on_open: Callable[[object], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.on_close = on_close
        self.on_open = on_open
        self._by_node: dict[object, Breaker] = {}
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")

    def __call__(self, node: object) -> Breaker:
        breaker = self._by_node.get(node)
        if breaker is None:
            with self._lock:
                breaker = self._by_node.setdefault(
                    node, Breaker(node, self.threshold, self.cooldown, self.on_close, self.on_open)
                )
        return breaker
