"""The push channel: tells every process at once that a tag or a namespace changed.

Tag versions and namespace generations may be held in-process, which saves a round trip on almost every
read. What makes that safe is this channel: every invalidation is published on it, one subscriber thread
per process applies it to the in-process copies, and while the subscription is not live (starting,
dropped, reconnecting) nothing held in-process is trusted, so every read asks Redis. An entry held
in-process is also never trusted for longer than its owner's bound (VERSION_CHECK_INTERVAL), in case a message is delayed.

Each KEY_PREFIX has a channel of its own, `<KEY_PREFIX>:~{invalidations}` (keys.py), so the ACL pattern
that gives a user its prefix's keys gives it its channel too, and nothing of another prefix. The hash tag
puts every prefix's channel in one slot, so one connection and one thread per process listen to all of
them, however many prefixes it uses. Sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis >= 7.0) is used where
the server has it, so the channels live on one shard instead of being broadcast over the whole cluster
bus; classic PUBLISH otherwise.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

from .forksafe import renew_locks_after_fork
from .topology import Call, ClusterTopology, PermissionRefusedError, Subscription

logger = logging.getLogger("django_distcache.backplane")

PING_EVERY = 1.0  # seconds of silence before the subscription checks that the connection is alive
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # backoff while the channel's node cannot be reached

Listener = Callable[[str, str, str, int | str], None]  # kind, key prefix, name, new version

_all_subscribers: weakref.WeakSet[Subscriber] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The subscriber thread does not survive fork(): nothing held in-process may be trusted until the
    # child has a subscription of its own (started by the child's first fetch).
    for subscriber in list(_all_subscribers):
        subscriber.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def stop_all(timeout: float = 5.0) -> None:
    """Stop every subscriber thread of this process and close its connection, quietly, waiting up to
    `timeout` seconds for them to end: for a deliberate shutdown (process exit, or a test suite about to
    stop the cluster it started), which must not be reported as an outage. A later fetch that would hold
    something in-process subscribes again."""
    subscribers = list(_all_subscribers)
    for subscriber in subscribers:
        subscriber.request_stop()
    deadline = time.monotonic() + timeout
    for subscriber in subscribers:
        subscriber.join(max(0.0, deadline - time.monotonic()))


# At exit the cluster may be going down too (one `docker compose down`): the daemon threads stop first, so
# that they do not log its disappearance as an outage while the interpreter finalizes.
atexit.register(stop_all, 1.0)


class Backplane:
    """The channel of one KEY_PREFIX on one cluster; its listeners are the in-process tag and namespace
    caches of that prefix. The subscription itself is the Subscriber's, shared by every prefix whose
    channel is in the same slot (all of them, unless a KEY_PREFIX holds a hash tag of its own)."""

    def __init__(self, subscriber: Subscriber, channel: bytes) -> None:
        self.subscriber = subscriber
        self.channel = channel
        self.connected = False
        self.connected_since = 0.0
        self.epoch = 0  # bumped on every message and every drop: a fetch that spans a bump is not cached
        self.messages = 0
        self.drops = 0
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")

    # -- trust -----------------------------------------------------------------------------------------
    def trusts(self, fetched_at: float) -> bool:
        """May a value fetched at `fetched_at` (time.monotonic) still be used without asking Redis?"""
        if not self.connected:
            return False
        return fetched_at >= self.connected_since

    def ensure_started(self) -> None:
        """Called whenever a value is fetched to be held in-process: the subscription must exist."""
        self.subscriber.want(self)

    def add_listener(self, listener: Listener) -> None:
        """Register an in-process cache; the subscription starts with the first read that would trust it
        (so constructing a backend, e.g. for `manage.py check`, opens no connection by itself); after a fork
        the child's first fetch starts its own."""
        with self._lock:
            self._listeners.append(listener)

    # -- publishing --------------------------------------------------------------------------------------
    def publish_call(self, kind: str, key_prefix: str, name: str, version: int | str) -> Call:
        message = json.dumps([kind, key_prefix, name, version])
        command = "SPUBLISH" if self.subscriber.sharded is not False else "PUBLISH"
        return Call(self.channel, (command, self.channel, message))

    # -- what the subscriber reports -----------------------------------------------------------------------
    def subscribed(self) -> None:
        self.connected_since = time.monotonic()
        self.epoch += 1
        self.connected = True

    def dropped(self) -> None:
        if self.connected:
            self.drops += 1
        self.connected = False
        self.epoch += 1

    def deliver(self, payload: bytes) -> None:
        self.epoch += 1  # whatever it says, a fetch that spans it is not held
        self.messages += 1
        try:
            what, key_prefix, name, version = json.loads(payload)
        except (ValueError, TypeError):
            # Not one of ours (anyone allowed to publish on the channel can send anything): ignored, so that
            # it cannot drop the subscription that every prefix of this process shares.
            logger.warning(
                "ignored a message on %s that is not an invalidation: %r", self.channel, payload[:80]
            )
            return
        for listener in list(self._listeners):
            listener(what, key_prefix, name, version)


class Subscriber:
    """One connection and one thread that listen to the channels of every KEY_PREFIX whose channel is in
    one slot: the number of prefixes a process uses costs no threads and no connections."""

    def __init__(self, topology: ClusterTopology) -> None:
        self.topology = topology
        self._wanted: dict[bytes, Backplane] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()  # the current thread's: set, it ends at its next look
        self._subscription: Subscription | None = None
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")
        _all_subscribers.add(self)

    @property
    def sharded(self) -> bool | None:
        """SSUBSCRIBE/SPUBLISH (Redis >= 7.0), or classic pub/sub; None: not known yet."""
        return self.topology.sharded_pubsub

    def want(self, backplane: Backplane) -> None:
        """Listen to `backplane`'s channel from now on (the thread subscribes to it within a moment)."""
        thread = self._thread
        if backplane.channel in self._wanted and thread is not None and thread.is_alive():
            return
        with self._lock:
            self._wanted[backplane.channel] = backplane
            if self._thread is None or not self._thread.is_alive():
                self._stopping = stopping = threading.Event()
                self._thread = threading.Thread(
                    target=self._run, args=(stopping,), name="distcache-backplane", daemon=True
                )
                self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to end (within PING_EVERY / 4) and close the subscription; nothing it held is
        trusted from then on. Logs nothing: stopping is not an outage."""
        self._stopping.set()

    def join(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def forget_after_fork(self) -> None:
        self._thread = None
        self._subscription = None  # the parent's socket: never closed from here
        for backplane in list(self._wanted.values()):
            backplane.dropped()

    def _run(self, stopping: threading.Event) -> None:
        failures = 0
        while not stopping.is_set():
            was_connected = False
            try:
                self._subscribe_and_listen(stopping)
            except PermissionRefusedError as error:
                if failures == 0:
                    logger.error(
                        "invalidation channel refused: %s. Until the cache's Redis user has what "
                        "docs/security.md lists, nothing is held in-process: every read asks Redis",
                        error,
                    )
            except Exception as error:  # the thread must outlive any failure; each outage is logged once
                was_connected = any(backplane.connected for backplane in list(self._wanted.values()))
                if stopping.is_set():
                    break  # told to stop: a connection closed under it is no outage
                if was_connected or failures == 0:
                    logger.warning(
                        "invalidation channel %s (%s: %s); in-process versions are not trusted until it is back",
                        "dropped" if was_connected else "unavailable",
                        type(error).__name__,
                        error,
                    )
            self._drop()
            failures = 0 if was_connected else failures + 1
            stopping.wait(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])
        self._drop()

    def _drop(self) -> None:
        for backplane in list(self._wanted.values()):
            backplane.dropped()
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            subscription.close()

    def _subscribe_and_listen(self, stopping: threading.Event) -> None:
        channels = list(self._wanted)
        subscription = self._subscription = self.topology.subscribe(channels, ping_every=PING_EVERY)
        subscribed = set(channels)
        logger.info("invalidation channel live on %s", subscription.node)
        while not stopping.is_set():
            if len(self._wanted) > len(subscribed):  # a prefix used for the first time since
                added = [channel for channel in list(self._wanted) if channel not in subscribed]
                subscription.subscribe(added)
                subscribed.update(added)
            message = subscription.get_message(timeout=PING_EVERY / 4)
            if message is None:
                continue
            backplane = self._wanted.get(message.channel)
            if backplane is None:
                continue
            if message.kind == "message":
                backplane.deliver(message.payload)
            else:
                backplane.subscribed()
