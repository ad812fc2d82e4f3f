"""The push channel: tells every process at once that a tag or a namespace changed.

Tag versions and namespace generations may be held in-process, which saves a round trip on almost every
read. What makes that safe is this channel: every invalidation is published on it, one subscriber thread
per process applies it to the in-process copies, and while the subscription is not live (starting,
dropped, reconnecting) nothing held in-process is trusted, so every read asks Redis. An entry held
in-process is also never trusted for longer than its owner's bound (TAG_VERSION_TTL,
NAMESPACE_CHECK_INTERVAL), in case a message is delayed.

Each KEY_PREFIX has a channel of its own, `<KEY_PREFIX>:~{invalidations}` (keys.py), so the ACL pattern
that gives a user its prefix's keys gives it its channel too, and nothing of another prefix. The hash tag
puts every prefix's channel in one slot, so one connection and one thread per process listen to all of
them, however many prefixes it uses. Sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis >= 7.0) is used where
the server has it, so the channels live on one shard instead of being broadcast over the whole cluster
bus; classic PUBLISH otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

from .forksafe import renew_locks_after_fork
from .topology import Call

logger = logging.getLogger("django_distcache.backplane")

PING_EVERY = 1.0  # seconds of silence before the subscriber checks that the connection is alive
RECONNECT_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # backoff while the channel's node cannot be reached

Listener = Callable[[str, str, str, int | str], None]  # kind, key prefix, name, new version

_all_subscribers: weakref.WeakSet[Subscriber] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The subscriber thread does not survive fork(): nothing held in-process may be trusted until the
    # child has a subscription of its own (started by the child's first fetch).
    for subscriber in list(_all_subscribers):
        subscriber.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


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

    def __init__(self, topology: Any) -> None:
        self.topology = topology
        self.sharded: bool | None = None  # SSUBSCRIBE (Redis >= 7.0), or classic pub/sub; None: not known yet
        self._wanted: dict[bytes, Backplane] = {}
        self._thread: threading.Thread | None = None
        self._connection: Any = None
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")
        _all_subscribers.add(self)

    def want(self, backplane: Backplane) -> None:
        """Listen to `backplane`'s channel from now on (the thread subscribes to it within a moment)."""
        thread = self._thread
        if backplane.channel in self._wanted and thread is not None and thread.is_alive():
            return
        with self._lock:
            self._wanted[backplane.channel] = backplane
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="distcache-backplane", daemon=True)
                self._thread.start()

    def forget_after_fork(self) -> None:
        self._thread = None
        self._connection = None
        for backplane in list(self._wanted.values()):
            backplane.dropped()

    def _run(self) -> None:
        failures = 0
        while True:
            was_connected = False
            try:
                self._subscribe_and_listen()
            except NoPermissionError as error:
                if failures == 0:
                    logger.error(
                        "invalidation channel refused: %s. Until the cache's Redis user has what "
                        "docs/security.md lists, nothing is held in-process: every read asks Redis",
                        error,
                    )
            except Exception as error:  # the thread must outlive any failure; each outage is logged once
                was_connected = any(backplane.connected for backplane in list(self._wanted.values()))
                if was_connected or failures == 0:
                    logger.warning(
                        "invalidation channel %s (%s: %s); in-process versions are not trusted until it is back",
                        "dropped" if was_connected else "unavailable",
                        type(error).__name__,
                        error,
                    )
            self._drop()
            failures = 0 if was_connected else failures + 1
            time.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])

    def _drop(self) -> None:
        for backplane in list(self._wanted.values()):
            backplane.dropped()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.disconnect()

    def _subscribe(self, connection: Any, channels: list[bytes]) -> None:
        """Ask for `channels`; their confirmations come back as replies the listening loop handles."""
        connection.send_command("SSUBSCRIBE" if self.sharded is not False else "SUBSCRIBE", *channels)

    def _first_subscription(self, connection: Any, channels: list[bytes]) -> None:
        """The first SSUBSCRIBE on a connection, read here: a server without sharded pub/sub (before Redis
        7.0) answers it with an error, and classic pub/sub is used from then on."""
        self._subscribe(connection, channels)
        try:
            reply = connection.read_response(push_request=True)
        except ResponseError as error:
            if self.sharded is not None or "unknown command" not in str(error).lower():
                raise
            self.sharded = False
            self._subscribe(connection, channels)
            reply = connection.read_response(push_request=True)
        if self.sharded is None:
            self.sharded = True
        if not isinstance(reply, list) or not reply or reply[0].lower() not in (b"ssubscribe", b"subscribe"):
            raise ResponseError(f"unexpected reply to a subscription: {reply!r}")
        self._handle(reply)

    def _subscribe_and_listen(self) -> None:
        channels = list(self._wanted)
        connection = self.topology.dedicated_connection(channels[0])
        self._connection = connection
        self._first_subscription(connection, channels)
        subscribed = set(channels)
        logger.info("invalidation channel live on %s:%s", connection.host, connection.port)
        silent_since = time.monotonic()
        ping_sent_at: float | None = None
        while True:
            if len(self._wanted) > len(subscribed):  # a prefix used for the first time since
                added = [channel for channel in list(self._wanted) if channel not in subscribed]
                self._subscribe(connection, added)
                subscribed.update(added)
            if connection.can_read(timeout=PING_EVERY / 4):
                reply = connection.read_response(push_request=True)
                silent_since, ping_sent_at = time.monotonic(), None  # anything heard proves it is alive
                self._handle(reply)
            elif ping_sent_at is not None and time.monotonic() - ping_sent_at >= PING_EVERY:
                raise ConnectionError("no answer to PING: the connection is half-open")
            elif ping_sent_at is None and time.monotonic() - silent_since >= PING_EVERY:
                connection.send_command("PING")
                ping_sent_at = time.monotonic()

    def _handle(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind = reply[0].lower() if isinstance(reply[0], bytes) else reply[0]
        backplane = self._wanted.get(reply[1])
        if kind in (b"message", b"smessage") and len(reply) >= 3:
            if backplane is not None:
                backplane.deliver(reply[2])
        elif kind in (b"ssubscribe", b"subscribe"):
            if backplane is not None:
                backplane.subscribed()
        elif kind in (b"sunsubscribe", b"unsubscribe"):
            # The server moved the channel's slot (resharding/failover): resubscribe where it lives now.
            raise ConnectionError("unsubscribed by the server")
