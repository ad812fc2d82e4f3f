"""Versioned keys: a namespace generation in every physical key (after the KEY_PREFIX), bumped in O(1).

`clear()` does not delete anything in the foreground: it writes a new random generation, so every key of
the old generation is unreachable at once, and a background purge (SCAN over every primary, UNLINK in
per-node batches) reclaims the memory. A missing generation key (evicted, deleted by hand) is replaced by a
new random one, which can only make entries miss, never resurrect them.

The generation is 48 random bits (8 characters; it was 64 bits in 11 characters): it is in every entry's key,
so every character costs memory in every entry. What it must guarantee is that a new generation never equals
one whose entries are still in Redis. Those are few: the current one and the retired ones the purge has not
finished (or whose entries still live out a TTL); the odds that one clear() draws any of k such generations
are k / 2**48 (with k = 10, one clear() a second for 100 years: about 1 in 9,000). A counter would be
shorter, but it restarts when its key is evicted or lost, which is exactly when an old generation must not
come back; random draws need no memory of the past. A generation of the older 11-character form found in
the namespace key is retired: listed for the purge and replaced.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import queue
import threading
import time
import weakref
from typing import TYPE_CHECKING

from . import scripts
from .backplane import Backplane
from .forksafe import renew_locks_after_fork
from .keys import GENERATION, LEGACY_GENERATION, RETIRED_GENERATION, KeyLayout
from .plans import Guarded, PlanOf
from .topology import OUTAGE_ERRORS, Call, ClusterTopology, CommandError, is_outage

if TYPE_CHECKING:
    from django.db.models import Model

logger = logging.getLogger("django_distcache.versioning")

PURGE_BATCH = 500


_fingerprints: weakref.WeakKeyDictionary[type[Model], str] = weakref.WeakKeyDictionary()


def model_fingerprint(model: type[Model]) -> str:
    """A short digest of a model's shape: app label, model name, and every concrete field's name, type and
    column. It changes when a migration adds, removes, renames or retypes a field, so keys derived from a
    model (see model_key) change with it: old entries simply miss and expire, no flush needed."""
    cached = _fingerprints.get(model)
    if cached is not None:
        return cached
    meta = model._meta
    parts = [meta.app_label, str(meta.model_name)]
    for model_field in meta.concrete_fields:
        field_type = type(model_field)
        parts.append(
            f"{model_field.name}={field_type.__module__}.{field_type.__qualname__}@{model_field.column}"
        )
    fingerprint = _fingerprints[model] = hashlib.blake2b("|".join(parts).encode(), digest_size=6).hexdigest()
    return fingerprint


def model_key(model: type[Model], *parts: object) -> str:
    """A cache key for something derived from `model`, carrying its fingerprint: `app.model:<fp>:parts`."""
    meta = model._meta
    suffix = ":".join(str(part) for part in parts)
    return f"{meta.app_label}.{meta.model_name}:{model_fingerprint(model)}:{suffix}"


_UNREADABLE = object()


def new_generation() -> str:
    """A random 48-bit generation, as 8 URL-safe characters (no glob character, never a `~`)."""
    return base64.urlsafe_b64encode(os.urandom(6)).decode()


class Namespace:
    """The current generation of one KEY_PREFIX on one cluster, cached in-process for a bounded time."""

    def __init__(
        self, layout: KeyLayout, check_interval: float, purger: Purger, backplane: Backplane
    ) -> None:
        self.layout = layout
        self.key_prefix = layout.key_prefix
        self.key = layout.internal("ns")
        self.purge_list = layout.internal("purge")
        self.check_interval = check_interval
        self.purger = purger
        self.backplane = backplane
        self.head: bytes | None = None
        self.checked_at = 0.0
        backplane.add_listener(self._on_message)

    def current(self) -> PlanOf[bytes]:
        """What every entry key starts with (`<KEY_PREFIX>:<generation>:`); yields one call to Redis unless
        the in-process copy is trusted."""
        checked_at = self.checked_at
        if (
            self.head is not None
            and time.monotonic() - checked_at < self.check_interval
            and self.backplane.trusts(checked_at)
        ):
            return self.head
        self.backplane.ensure_started()
        proposed = new_generation()
        epoch, fetched_at = self.backplane.epoch, time.monotonic()
        if self.head is None:
            generation = yield from self._read_plan(proposed)
        else:
            generation = yield Guarded(self._read_plan(proposed), "namespace", _UNREADABLE)
            if generation is _UNREADABLE:
                # The node holding the generation is down or hung: keep the generation we hold rather
                # than make every key of every node miss. A clear() cannot complete while that node is
                # unreachable (it writes there first), so the held generation is the current one unless a
                # bump landed just before the node failed and its push was lost (docs/keys-and-clear.md).
                return self.head
        if self.head is None:
            self.purger.resume(self)
        head = self.layout.head(generation)
        if epoch == self.backplane.epoch:  # no message crossed the fetch: safe to hold
            self.head, self.checked_at = head, fetched_at
        return head

    def _read_plan(self, proposed: str) -> PlanOf[str]:
        """The generation in Redis, `proposed` written first if there is none."""
        existing: bytes | None = yield Call(self.key, ("SET", self.key, proposed, "NX", "GET"))
        if existing is None:
            return proposed
        for _ in range(3):
            if GENERATION.fullmatch(existing):
                return existing.decode()
            if LEGACY_GENERATION.fullmatch(existing):
                # Written by an earlier release: its entries (of an older envelope format too) are retired.
                yield Call(self.purge_list, ("RPUSH", self.purge_list, existing), idempotent=False)
            logger.warning(
                "namespace key %r held %r, not a generation: replaced (every entry of %r misses)",
                self.key,
                existing[:40],
                self.key_prefix,
            )
            # What the key holds now: `proposed`, or what another process wrote first.
            replaced: bytes = yield Call(
                self.key, ("EVAL", scripts.REPLACE_FOREIGN_GENERATION, 1, self.key, existing, proposed)
            )
            existing = replaced
        raise ValueError(f"namespace key {self.key!r} keeps being overwritten with {existing[:40]!r}")

    def _on_message(self, kind: str, key_prefix: str, name: str, version: int | str) -> None:
        if kind == "ns" and key_prefix == self.key_prefix:
            self.checked_at = float("-inf")  # re-read on next use: bumps may be pushed out of order

    def bump(self) -> PlanOf[None]:
        """Make every key of this namespace unreachable in O(1), then purge the old ones in the background.

        The generation to retire is listed for the purge before the switch, so a refused or failed list
        write leaves the namespace as it was; a generation listed but still current is never purged."""
        self.purger.resume(self)
        listed = yield Call(self.key, ("GET", self.key))
        if listed is not None and GENERATION.fullmatch(listed):
            yield Call(self.purge_list, ("RPUSH", self.purge_list, listed), idempotent=False)
        generation = new_generation()
        old = yield Call(self.key, ("SET", self.key, generation, "GET"))
        self.backplane.epoch += 1  # a fetch in flight in another thread must not reinstall the old one
        self._install(generation)
        if old is not None and GENERATION.fullmatch(old):
            if old != listed:  # another clear() switched it between our read and our switch
                yield Call(self.purge_list, ("RPUSH", self.purge_list, old), idempotent=False)
            self.purger.enqueue(self, old.decode())
        (published,) = yield [self.backplane.publish_call("ns", self.key_prefix, "", generation)]
        if isinstance(published, BaseException) and not is_outage(published):
            raise published

    def _install(self, generation: str) -> None:
        self.head = self.layout.head(generation)
        self.checked_at = time.monotonic()


class Purger:
    """One background thread per cluster that UNLINKs the keys of retired generations."""

    def __init__(self, topology: ClusterTopology) -> None:
        self.topology = topology
        self.queue: queue.Queue[tuple[Namespace, str | None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")
        self._resumed: set[bytes] = set()
        self.idle = threading.Event()
        self.idle.set()

    def enqueue(self, namespace: Namespace, generation: str | None) -> None:
        """Purge `generation`, or (None) every generation still listed in the namespace's purge list."""
        self.idle.clear()
        self.queue.put((namespace, generation))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="distcache-purge", daemon=True)
                self._thread.start()

    def resume(self, namespace: Namespace) -> None:
        """Pick up purges that a process which has since exited did not finish (read in the thread)."""
        if namespace.purge_list not in self._resumed:
            self._resumed.add(namespace.purge_list)
            self.enqueue(namespace, None)

    def _pending(self, namespace: Namespace) -> list[str]:
        purge_list = namespace.purge_list
        pending = self.topology.execute(Call(purge_list, ("LRANGE", purge_list, 0, -1)))
        return [g.decode() for g in pending or () if RETIRED_GENERATION.fullmatch(g)]

    def _run(self) -> None:
        while True:
            try:
                namespace, generation = self.queue.get(timeout=5)
            except queue.Empty:
                self.idle.set()
                return
            purge_list = namespace.purge_list
            try:
                for retired in [generation] if generation else self._pending(namespace):
                    if self.topology.execute(Call(namespace.key, ("GET", namespace.key))) == retired.encode():
                        continue  # listed by a clear() that did not get to switch: still in use
                    removed = self.purge(namespace, retired)
                    self.topology.execute(Call(purge_list, ("LREM", purge_list, 0, retired)))
                    logger.info("purged %d keys of retired generation %s", removed, retired)
            except OUTAGE_ERRORS as error:
                # Still listed in Redis: the next process that starts with this KEY_PREFIX retries it.
                logger.warning("purge of generation %s interrupted: %s", generation or "(pending)", error)
            except CommandError as error:
                # Refused (a Redis ACL without SCAN, UNLINK, LRANGE or LREM, say): nothing a retry mends.
                logger.error(
                    "purge of retired generation %s of KEY_PREFIX %r stopped: %s. It stays listed in %s; "
                    "the next process that starts with this KEY_PREFIX purges it again",
                    generation or "(pending)",
                    namespace.key_prefix,
                    error,
                    purge_list.decode(errors="replace"),
                )
            finally:
                if self.queue.empty():
                    self.idle.set()

    def purge(self, namespace: Namespace, generation: str) -> int:
        removed = 0
        pattern = namespace.layout.generation_pattern(generation)
        for node in self.topology.primaries():
            for keys in self.topology.scan(node, pattern):
                for start in range(0, len(keys), PURGE_BATCH):
                    chunk = keys[start : start + PURGE_BATCH]
                    results = self.topology.execute_batch([Call(k, ("UNLINK", k)) for k in chunk])
                    for result in results:
                        if isinstance(result, BaseException):
                            raise result  # stays listed as pending, so it is purged again later
                        removed += result
        return removed
