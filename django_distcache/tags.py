"""Tags: O(1) invalidation of every entry that carries a tag, correct on a cluster and under eviction.

Each tag has a key of its own (so tags spread over the cluster's slots) holding a random 64-bit version.
A tagged write records `{tag: version}` in the entry's envelope; a read compares those stamps with the
current versions and treats any difference as a miss; `invalidate_tags` writes a new random version (one
SET per tag, whatever the tag covers). A missing tag key means *invalid*: an evicted or deleted tag can
only make entries miss, never bring dead ones back. Versions are random, never counters, so a re-created
tag cannot repeat an old version.

Versions may be held in-process (TAG_VERSION_TTL seconds at most) while the backplane's subscription is
live; every invalidation is pushed over it, so other processes drop the old version at once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator, Iterable
from typing import Any

from .backplane import Backplane
from .forksafe import renew_locks_after_fork
from .topology import Call, is_outage

TAG_KEY_PREFIX = "~tag:"  # after `<KEY_PREFIX>:` (keys.py)
MAX_TAG_LENGTH = 200

Plan = Generator[Any, Any, Any]


def new_version() -> int:
    return int.from_bytes(os.urandom(8), "big")


def validate_tags(tags: Any) -> list[str]:
    """Tags must be a list/tuple/set of non-empty strings; a bare string is refused (it would be letters)."""
    if tags is None:
        return []
    if isinstance(tags, str | bytes) or not isinstance(tags, Iterable):
        raise TypeError(f"tags must be a list of strings, got {type(tags).__name__}: {tags!r}")
    result = []
    for tag in tags:
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"each tag must be a non-empty str, got {tag!r}")
        if len(tag.encode()) > MAX_TAG_LENGTH:
            raise ValueError(f"tag longer than {MAX_TAG_LENGTH} bytes: {tag[:40]!r}...")
        result.append(tag)
    return list(dict.fromkeys(result))


class TagVersions:
    """The current version of each tag of one KEY_PREFIX, from Redis or the in-process copy."""

    def __init__(self, key_prefix: str, local_ttl: float, backplane: Backplane) -> None:
        self.key_prefix = key_prefix
        self.prefix = (key_prefix + ":" + TAG_KEY_PREFIX).encode()
        self.local_ttl = local_ttl
        self.backplane = backplane
        self._local: dict[str, tuple[int, float]] = {}  # tag -> (version, fetched at)
        self.outbox: Any = None  # set by the cache: invalidations waiting for their node (outbox.py)
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")
        if local_ttl > 0:
            backplane.add_listener(self._on_message)

    def tag_key(self, tag: str) -> bytes:
        return self.prefix + tag.encode()

    # -- in-process copies --------------------------------------------------------------------------
    def _held(self, tag: str, now: float) -> int | None:
        entry = self._local.get(tag)
        if entry is None:
            return None
        version, fetched_at = entry
        if now - fetched_at < self.local_ttl and self.backplane.trusts(fetched_at):
            return version
        return None

    def _hold(self, versions: dict[str, int], epoch: int, fetched_at: float) -> None:
        # A message or a drop while the fetch was in flight may carry a newer version: do not keep ours.
        if self.local_ttl > 0 and epoch == self.backplane.epoch:
            with self._lock:
                for tag, version in versions.items():
                    self._local[tag] = (version, fetched_at)

    def _on_message(self, kind: str, key_prefix: str, name: str, version: Any) -> None:
        # Forget rather than install: two invalidations of one tag may be pushed out of order, and the
        # next read fetches whichever version Redis holds now.
        if kind == "tag" and key_prefix == self.key_prefix:
            with self._lock:
                self._local.pop(name, None)

    def held_verdict(self, stamps: dict[str, int]) -> bool | None:
        """From the in-process copies alone: True (all current), False (one is stale), None (ask Redis)."""
        outbox = self.outbox
        if outbox is not None and not outbox.empty and outbox.blocks(stamps):
            return False  # an invalidation of one of these tags is waiting to land
        if self.local_ttl <= 0:
            return None
        backplane, local, now = self.backplane, self._local, time.monotonic()
        if not backplane.connected:
            return None
        since, ttl = backplane.connected_since, self.local_ttl
        for tag, stamped in stamps.items():
            entry = local.get(tag)
            if entry is None or now - entry[1] >= ttl or entry[1] < since:
                return None
            if entry[0] != stamped:
                return False
        return True

    def held_count(self) -> int:
        now = time.monotonic()
        return sum(1 for tag in list(self._local) if self._held(tag, now) is not None)

    # -- plans ----------------------------------------------------------------------------------------
    def current(self, tags: list[str], create: bool) -> Plan:
        """{tag: version}. With `create`, a missing tag key is created with a random version (writes);
        without, a missing tag maps to None, which invalidates whatever carries it (reads)."""
        now = time.monotonic()
        versions: dict[str, int | None] = {}
        missing = []
        for tag in tags:
            held = self._held(tag, now)
            if held is None:
                missing.append(tag)
            else:
                versions[tag] = held
        if not missing:
            return self._with_pending(versions, create)
        self.backplane.ensure_started()
        epoch, fetched_at = self.backplane.epoch, time.monotonic()
        proposals = {tag: new_version() for tag in missing} if create else {}
        calls = [
            Call(self.tag_key(tag), ("SET", self.tag_key(tag), proposals[tag], "NX", "GET"), repairable=True)
            if create
            else Call(self.tag_key(tag), ("GET", self.tag_key(tag)))
            for tag in missing
        ]
        replies = yield calls
        fetched: dict[str, int] = {}
        for tag, reply in zip(missing, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply  # an outage: the caller's failure policy decides (miss / dropped write)
            if reply is None:
                if create:
                    fetched[tag] = proposals[tag]
                else:
                    versions[tag] = None
            else:
                fetched[tag] = int(reply)
        versions.update(fetched)
        self._hold(fetched, epoch, fetched_at)
        return self._with_pending(versions, create)

    def _with_pending(self, versions: dict[str, Any], create: bool) -> dict[str, Any]:
        outbox = self.outbox
        if outbox is not None and not outbox.empty and not create:
            for tag in versions:
                if outbox.blocks((tag,)):
                    versions[tag] = None  # an invalidation is pending: whatever carries it is a miss
        return versions

    def invalidate(self, tags: list[str]) -> Plan:
        """Give each tag a new random version, then push it to every process."""
        new = {tag: new_version() for tag in tags}
        replies = yield [
            Call(self.tag_key(tag), ("SET", self.tag_key(tag), version), repairable=True)
            for tag, version in new.items()
        ]
        queued = {}
        for (tag, version), reply in zip(new.items(), replies, strict=True):
            if isinstance(reply, BaseException):
                if self.outbox is None or not is_outage(reply):
                    raise reply
                queued[tag] = version  # its node is unreachable: kept and retried, never dropped
        if queued:
            with self._lock:
                for tag in queued:
                    self._local.pop(tag, None)
            self.outbox.add(queued)
        count = len(new)
        new = {tag: version for tag, version in new.items() if tag not in queued}
        with self._lock:
            self.backplane.epoch += 1  # a fetch in flight in another thread must not reinstall an old version
            now = time.monotonic()
            for tag, version in new.items():
                self._local[tag] = (version, now)
        publishes = yield [
            self.backplane.publish_call("tag", self.key_prefix, tag, version) for tag, version in new.items()
        ]
        for reply in publishes:
            if isinstance(reply, BaseException) and not is_outage(reply):
                raise reply
        return count


def stamps_are_current(stamps: dict[str, int], current: dict[str, int | None]) -> bool:
    return all(current.get(tag) == version for tag, version in stamps.items())
