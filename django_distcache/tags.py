"""Tags: O(1) invalidation of every entry that carries a tag, correct on a cluster and under eviction.

Each tag has a key of its own (so tags spread over the cluster's slots) holding a random 64-bit version. A
tagged write stamps the entry's envelope with its tags' versions; a read compares the stamp with the
current versions and treats any difference as a miss; `invalidate_tags` writes a new random version (one
SET per tag, whatever the tag covers). A missing tag key means *invalid*: an evicted, expired or deleted
tag can only make entries miss, never bring dead ones back. Versions are random, never counters, so a
re-created tag cannot repeat an old version.

The stamp (codec.encode_tag_stamps) is the 4-byte id of each tag and ONE 8-byte BLAKE2b digest of their
versions, not each name and version (21 bytes for three tags, against 9 plus the name's length per tag).
Why it keeps every guarantee:
- Any new version of any one tag, or a missing tag key, changes the digest: a miss, as before; two sets of
  versions give one digest with odds of 2^-64 per comparison, as likely as a re-created tag repeating a
  random version. The signature covers the stamp with the rest of the header: a forged one is refused.
- A tag's id is a 32-bit hash of its name and its key is named by the id (`~tag:<8 hex digits>`), so the
  id alone tells a reader which key to read. Tags whose ids collide share one key, one version and one
  in-process copy: invalidating either invalidates both (over-invalidation, never a stale read), since
  every path that changes or forgets a version maps names to keys through the same hash: `invalidate`,
  the outbox (keyed by name, checked by id: _queued), the pushed messages (they carry the name, the
  receiver hashes it), `for_write` (held copies by id), model write-through/behind (they call
  `invalidate`). A write whose tags share a key and came with two versions is stored born stale.
- Ids are not keyed with SECRET_KEY: a rotated key would rename every tag key, and an invalidation by
  name would then miss entries stamped under the old names. Someone who can choose tag names can make
  two collide on purpose: that only costs hits.
- The names were measured before being dropped: a digest alone (names kept) leaves a 3-tag five-field
  entry at 138 bytes, in the same 160-byte allocation as today's 154, so it saves no memory at all; ids
  bring it to 122 bytes, in the 128-byte class (measured with bench.bench_values). No feature reads an
  entry's tag names back.

A tag key lives as long as the entries stamped with it (plus TAG_TTL_MARGIN), forever only once an entry
stored forever was stamped with it: a write extends it, never shortens it. Invalidating a tag that nothing
carries creates nothing (a missing tag is invalid already), and tag keys go away on their own.

Versions may be held in-process (VERSION_CHECK_INTERVAL seconds at most) while the backplane's subscription is
live; every invalidation is pushed over it, so other processes drop the old version at once.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import scripts
from .backplane import Backplane
from .codec import TagStamps, tag_id
from .forksafe import renew_locks_after_fork
from .outbox import Outbox
from .plans import PlanOf
from .topology import Call, is_outage

TAG_KEY_PREFIX = "~tag:"  # after `<KEY_PREFIX>:` (keys.py)
MAX_TAG_LENGTH = 200
MAX_TAGS_PER_VALUE = 256
# A tag key outlives the longest-lived entry stamped with it by this much: the time between reading the
# versions and storing the entry (a computation, a database read) is covered, and a tag nothing carries
# any more is gone this long after its last entry.
TAG_TTL_MARGIN = 60.0
_LONGEST_TTL_MS = 10**15  # about 31,700 years: a TTL plus the margin stays within what Redis accepts


def tag_key(key_prefix: str, tag: str) -> str:
    """The Redis key holding the version of `tag` under `key_prefix`: `<KEY_PREFIX>:~tag:<8 hex digits>`,
    the digits being the tag's 32-bit id (codec.tag_id)."""
    return f"{key_prefix}:{TAG_KEY_PREFIX}{tag_id(tag):08x}"


def new_version() -> int:
    return int.from_bytes(os.urandom(8), "big")


def validate_tags(tags: Any, limit: int | None = MAX_TAGS_PER_VALUE) -> list[str]:
    """Tags must be a list/tuple/set of non-empty strings; a bare string is refused (it would be letters).
    At most `limit` distinct tags (the tags of one value; None for invalidations, which store nothing)."""
    if tags is None:
        return []
    if isinstance(tags, str | bytes) or not isinstance(tags, Iterable):
        raise TypeError(f"tags must be a list of strings, got {type(tags).__name__}: {tags!r}")
    result: dict[str, None] = {}  # ordered, without repeats
    for tag in tags:
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"each tag must be a non-empty str, got {tag!r}")
        try:
            size = len(tag.encode())
        except UnicodeEncodeError:
            raise ValueError(f"tag is not encodable as UTF-8 (a lone surrogate?): {tag[:40]!r}") from None
        if size > MAX_TAG_LENGTH:
            raise ValueError(f"tag longer than {MAX_TAG_LENGTH} bytes: {tag[:40]!r}...")
        result[tag] = None
        if limit is not None and len(result) > limit:
            raise ValueError(f"more than {limit} tags on one value (MAX_TAGS_PER_VALUE); nothing was written")
    return list(result)


class TagVersions:
    """The current version of each tag of one KEY_PREFIX, from Redis or the in-process copy."""

    def __init__(self, key_prefix: str, local_ttl: float, backplane: Backplane) -> None:
        self.key_prefix = key_prefix
        self.prefix = (key_prefix + ":" + TAG_KEY_PREFIX).encode()
        self.local_ttl = local_ttl
        self.backplane = backplane
        # tag id -> (version, fetched at, until when its key is known to live: 0 unknown, inf forever);
        # all three on time.monotonic(). Keyed by id, as the entries name their tags: tags whose ids
        # collide share a key, so they share what is held of it too.
        self._local: dict[int, tuple[int, float, float]] = {}
        self.outbox: Outbox | None = None  # set by the core: invalidations waiting for their node
        self._queued_ids: tuple[int, frozenset[int]] = (-1, frozenset())  # (outbox.changes, their ids)
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")
        if local_ttl > 0:
            backplane.add_listener(self._on_message)

    def tag_key(self, tag: str) -> bytes:
        return self.id_key(tag_id(tag))

    def id_key(self, tag: int) -> bytes:
        return self.prefix + b"%08x" % tag

    # -- in-process copies --------------------------------------------------------------------------
    def _held(self, tag: int, now: float) -> tuple[int, float, float] | None:
        entry = self._local.get(tag)
        if entry is None:
            return None
        if now - entry[1] < self.local_ttl and self.backplane.trusts(entry[1]):
            return entry
        return None

    def _hold(self, versions: dict[int, int], epoch: int, fetched_at: float, kept_until: float = 0.0) -> None:
        # A message or a drop while the fetch was in flight may carry a newer version: do not keep ours.
        if self.local_ttl > 0 and epoch == self.backplane.epoch:
            with self._lock:
                for tag, version in versions.items():
                    # The same version is the same key (versions are random): what we knew of its life holds.
                    old = self._local.get(tag)
                    known = old[2] if old is not None and old[0] == version else 0.0
                    self._local[tag] = (version, fetched_at, max(kept_until, known))

    def _on_message(self, kind: str, key_prefix: str, name: str, version: int | str) -> None:
        # Forget rather than install: two invalidations of one tag may be pushed out of order, and the
        # next read fetches whichever version Redis holds now.
        if kind == "tag" and key_prefix == self.key_prefix:
            with self._lock:
                self._local.pop(tag_id(name), None)

    def _queued(self, ids: Iterable[int]) -> bool:
        """True if an invalidation of a tag with one of these ids waits in the outbox (whose tags are
        names: their ids are what the entries carry)."""
        outbox = self.outbox
        if outbox is None or outbox.empty:
            return False
        if outbox.overflowed:
            return True
        # Up to OUTBOX_SIZE names: hashed once per change of the outbox, not once per read.
        changes, queued = self._queued_ids
        if changes != outbox.changes:
            changes = outbox.changes  # (read before the names: a change after it renews them next time)
            queued = frozenset(tag_id(tag) for tag in list(outbox.pending))
            self._queued_ids = (changes, queued)
        return any(tag in queued for tag in ids)

    def held_verdict(self, stamps: TagStamps) -> bool | None:
        """From the in-process copies alone: True (all current), False (stale), None (ask Redis)."""
        outbox = self.outbox
        if outbox is not None and not outbox.empty and self._queued(stamps.ids):
            return False  # an invalidation of one of these tags is waiting to land
        if self.local_ttl <= 0:
            return None
        backplane, local, now = self.backplane, self._local, time.monotonic()
        if not backplane.connected:
            return None
        since, ttl = backplane.connected_since, self.local_ttl
        versions: dict[int, int | None] = {}
        for tag in stamps.ids:
            entry = local.get(tag)
            if entry is None or now - entry[1] >= ttl or entry[1] < since:
                return None
            versions[tag] = entry[0]
        return stamps.matches(versions)

    def held_count(self) -> int:
        now = time.monotonic()
        return sum(1 for tag in list(self._local) if self._held(tag, now) is not None)

    # -- plans ----------------------------------------------------------------------------------------
    def current(self, tags: list[int]) -> PlanOf[dict[int, int | None]]:
        """{tag id: version} for a read of entries carrying these tag ids; a missing tag key maps to None,
        which invalidates whatever carries it."""
        now = time.monotonic()
        versions: dict[int, int | None] = {}
        missing = []
        for tag in tags:
            held = self._held(tag, now)
            if held is None:
                missing.append(tag)
            else:
                versions[tag] = held[0]
        if missing:
            self.backplane.ensure_started()
            epoch, fetched_at = self.backplane.epoch, time.monotonic()
            replies = yield [Call(self.id_key(tag), ("GET", self.id_key(tag))) for tag in missing]
            fetched: dict[int, int] = {}
            for tag, reply in zip(missing, replies, strict=True):
                if isinstance(reply, BaseException):
                    raise reply  # an outage: the caller's failure policy decides (a miss)
                if reply is None:
                    versions[tag] = None
                else:
                    fetched[tag] = int(reply)
            versions.update(fetched)
            self._hold(fetched, epoch, fetched_at)
        outbox = self.outbox
        if outbox is not None and not outbox.empty:
            for tag in versions:
                if self._queued((tag,)):
                    versions[tag] = None  # an invalidation is pending: whatever carries it is a miss
        return versions

    def for_write(self, tags: list[str], expiry_ms: int | None) -> PlanOf[dict[str, int]]:
        """{tag: version} to stamp an entry that Redis keeps `expiry_ms` (None: forever), read before its
        value is computed. A missing tag key is created; each tag key is made to live at least as long as
        the entry plus TAG_TTL_MARGIN. A held version whose key is known to live long enough costs nothing."""
        now = time.monotonic()
        if expiry_ms is None:
            ttl_ms: int | str = ""
            needed_until = math.inf
        else:
            expiry_ms = max(expiry_ms, 0)
            ttl_ms = min(expiry_ms + int(TAG_TTL_MARGIN * 1000), _LONGEST_TTL_MS)
            # Half the margin is left for the time between now and the entry's write.
            needed_until = now + expiry_ms / 1000 + TAG_TTL_MARGIN / 2
        versions: dict[str, int] = {}
        ask = []
        for tag in dict.fromkeys(tags):
            held = self._held(tag_id(tag), now)
            if held is not None and held[2] >= needed_until:
                versions[tag] = held[0]
            else:
                ask.append(tag)
        if not ask:
            return versions
        self.backplane.ensure_started()
        epoch, fetched_at = self.backplane.epoch, time.monotonic()
        replies = yield [
            Call(
                self.tag_key(tag),
                ("EVAL", scripts.TAG_VERSION_FOR_WRITE, 1, self.tag_key(tag), new_version(), ttl_ms),
                repairable=True,
            )
            for tag in ask
        ]
        fetched: dict[str, int] = {}
        for tag, reply in zip(ask, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply  # an outage: the caller's failure policy decides (a dropped write)
            fetched[tag] = int(reply)
        versions.update(fetched)
        # The script ran after `fetched_at`, so the key lives at least until then plus its TTL.
        kept_until = math.inf if expiry_ms is None else fetched_at + int(ttl_ms) / 1000
        self._hold({tag_id(tag): version for tag, version in fetched.items()}, epoch, fetched_at, kept_until)
        return versions

    def invalidate(self, tags: list[str]) -> PlanOf[int]:
        """Give each existing tag key a new random version (its TTL kept), then push it to every process.

        A missing tag key is left missing: nothing can carry it (missing already means invalid), so
        invalidating tags that were never written creates nothing. Tags whose ids collide share a key:
        it gets one new version, under the first of their names (a receiver of the push hashes the name)."""
        named: dict[int, str] = {}
        for tag in tags:
            named.setdefault(tag_id(tag), tag)
        new = {tag: new_version() for tag in named.values()}
        replies = yield [
            Call(self.tag_key(tag), ("SET", self.tag_key(tag), version, "XX", "KEEPTTL"), repairable=True)
            for tag, version in new.items()
        ]
        outbox = self.outbox
        queued: dict[str, int] = {}  # (only with an outbox to keep them)
        absent: set[str] = set()
        for (tag, version), reply in zip(new.items(), replies, strict=True):
            if isinstance(reply, BaseException):
                if outbox is None or not is_outage(reply):
                    raise reply
                queued[tag] = version  # its node is unreachable: kept and retried, never dropped
            elif reply is None:
                absent.add(tag)
        if outbox is not None and queued:
            with self._lock:
                for tag in queued:
                    self._local.pop(tag_id(tag), None)
            outbox.add(queued)
        new = {tag: version for tag, version in new.items() if tag not in queued}
        with self._lock:
            self.backplane.epoch += 1  # a fetch in flight in another thread must not reinstall an old version
            now = time.monotonic()
            for tag, version in new.items():
                previous = self._local.pop(tag_id(tag), None)
                if tag not in absent:  # KEEPTTL: what was known of the key's life still holds
                    self._local[tag_id(tag)] = (version, now, previous[2] if previous is not None else 0.0)
        # Pushed for absent tags too: another process may still hold a version of a key that was evicted.
        publishes = yield [
            self.backplane.publish_call("tag", self.key_prefix, tag, version) for tag, version in new.items()
        ]
        for reply in publishes:
            if isinstance(reply, BaseException) and not is_outage(reply):
                raise reply
        return len(tags)


def stamps_are_current(stamps: TagStamps, current: Mapping[int, int | None]) -> bool:
    """True if the versions read now (tag id -> version, None for a missing key) are those `stamps` were
    made of."""
    return stamps.matches(current)
