"""Versioned keys: a namespace generation in front of every physical key, bumped in O(1).

`clear()` does not delete anything in the foreground: it writes a new random generation, so every key of
the old generation is unreachable at once, and a background purge (SCAN over every primary, UNLINK in
per-node batches) reclaims the memory. A missing generation key (evicted, deleted by hand) is replaced by a
new random one, which can only make entries miss, never resurrect them.
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
from collections.abc import Generator
from typing import Any

from .backplane import Backplane
from .forksafe import renew_locks_after_fork
from .topology import OUTAGE_ERRORS, Call, is_outage

logger = logging.getLogger("django_distcache.versioning")

NAMESPACE_KEY_PREFIX = "~distcache:ns:"
PURGE_LIST_PREFIX = "~distcache:purge:"
PURGE_BATCH = 500


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model: Any) -> str:
    """A short digest of a model's shape: app label, model name, and every concrete field's name, type and
    column. It changes when a migration adds, removes, renames or retypes a field, so keys derived from a
    model (see model_key) change with it: old entries simply miss and expire, no flush needed."""
    cached = _fingerprints.get(model)
    if cached is not None:
        return cached
    meta = model._meta
    parts = [meta.app_label, meta.model_name]
    for model_field in meta.concrete_fields:
        field_type = type(model_field)
        parts.append(
            f"{model_field.name}={field_type.__module__}.{field_type.__qualname__}@{model_field.column}"
        )
    fingerprint = _fingerprints[model] = hashlib.blake2b("|".join(parts).encode(), digest_size=6).hexdigest()
    return fingerprint


def model_key(model: Any, *parts: Any) -> str:
    """A cache key for something derived from `model`, carrying its fingerprint: `app.model:<fp>:parts`."""
    meta = model._meta
    suffix = ":".join(str(part) for part in parts)
    return f"{meta.app_label}.{meta.model_name}:{model_fingerprint(model)}:{suffix}"


_UNREADABLE = object()


def new_generation() -> str:
    """A random 64-bit generation, as 11 characters that are safe in a SCAN MATCH pattern."""
    return base64.urlsafe_b64encode(os.urandom(8)).rstrip(b"=").decode()


class Namespace:
    """The current generation of one KEY_PREFIX on one cluster, cached in-process for a bounded time."""

    def __init__(self, key_prefix: str, check_interval: float, purger: Purger, backplane: Backplane) -> None:
        self.key_prefix = key_prefix
        self.key = (NAMESPACE_KEY_PREFIX + key_prefix).encode()
        self.purge_list = (PURGE_LIST_PREFIX + key_prefix).encode()
        self.check_interval = check_interval
        self.purger = purger
        self.backplane = backplane
        self.prefix: bytes | None = None
        self.checked_at = 0.0
        backplane.add_listener(self._on_message)

    def current(self) -> Generator[Call, Any, bytes]:
        """The physical-key prefix; yields one call to Redis unless the in-process copy is trusted."""
        checked_at = self.checked_at
        if (
            self.prefix is not None
            and time.monotonic() - checked_at < self.check_interval
            and self.backplane.trusts(checked_at)
        ):
            return self.prefix
        self.backplane.ensure_started()
        proposed = new_generation()
        epoch, fetched_at = self.backplane.epoch, time.monotonic()
        if self.prefix is None:
            existing = yield Call(self.key, ("SET", self.key, proposed, "NX", "GET"))
        else:
            from .cache import Guarded  # (cache.py imports this module)

            existing = yield Guarded(self._read_plan(proposed), "namespace", _UNREADABLE)
            if existing is _UNREADABLE:
                # The node holding the generation is down or hung: keep the generation we hold rather
                # than make every key of every node miss. A clear() cannot complete while that node is
                # unreachable (it writes there first), so the held generation is the current one unless a
                # bump landed just before the node failed and its push was lost (docs/keys-and-clear.md).
                return self.prefix
        generation = existing.decode() if existing else proposed
        if self.prefix is None:
            self.purger.resume(self.purge_list)
        prefix = generation.encode() + b":"
        if epoch == self.backplane.epoch:  # no message crossed the fetch: safe to hold
            self.prefix, self.checked_at = prefix, fetched_at
        return prefix

    def _read_plan(self, proposed: str) -> Generator[Call, Any, Any]:
        return (yield Call(self.key, ("SET", self.key, proposed, "NX", "GET")))

    def _on_message(self, kind: str, key_prefix: str, name: str, version: Any) -> None:
        if kind == "ns" and key_prefix == self.key_prefix:
            self.checked_at = float("-inf")  # re-read on next use: bumps may be pushed out of order

    def bump(self) -> Generator[Call, Any, None]:
        """Make every key of this namespace unreachable in O(1), then purge the old ones in the background."""
        self.purger.resume(self.purge_list)
        generation = new_generation()
        old = yield Call(self.key, ("SET", self.key, generation, "GET"))
        self.backplane.epoch += 1  # a fetch in flight in another thread must not reinstall the old one
        self._install(generation)
        (published,) = yield [self.backplane.publish_call("ns", self.key_prefix, "", generation)]
        if isinstance(published, BaseException) and not is_outage(published):
            raise published
        if old:
            yield Call(self.purge_list, ("RPUSH", self.purge_list, old), idempotent=False)
            self.purger.enqueue(self.purge_list, old.decode())

    def _install(self, generation: str) -> None:
        self.prefix = generation.encode() + b":"
        self.checked_at = time.monotonic()


class Purger:
    """One background thread per cluster that UNLINKs the keys of retired generations."""

    def __init__(self, topology: Any) -> None:
        self.topology = topology
        self.queue: queue.Queue[tuple[bytes, str | None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        renew_locks_after_fork(self, "_lock")
        self._resumed: set[bytes] = set()
        self.idle = threading.Event()
        self.idle.set()

    def enqueue(self, purge_list: bytes, generation: str | None) -> None:
        """Purge `generation`, or (None) every generation still listed in `purge_list`."""
        self.idle.clear()
        self.queue.put((purge_list, generation))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="distcache-purge", daemon=True)
                self._thread.start()

    def resume(self, purge_list: bytes) -> None:
        """Pick up purges that a process which has since exited did not finish (read in the thread)."""
        if purge_list not in self._resumed:
            self._resumed.add(purge_list)
            self.enqueue(purge_list, None)

    def _pending(self, purge_list: bytes) -> list[str]:
        pending = self.topology.execute(Call(purge_list, ("LRANGE", purge_list, 0, -1)))
        return [generation.decode() for generation in pending or ()]

    def _run(self) -> None:
        while True:
            try:
                purge_list, generation = self.queue.get(timeout=5)
            except queue.Empty:
                self.idle.set()
                return
            try:
                for retired in [generation] if generation else self._pending(purge_list):
                    removed = self.purge(retired)
                    self.topology.execute(Call(purge_list, ("LREM", purge_list, 0, retired)))
                    logger.info("purged %d keys of retired generation %s", removed, retired)
            except OUTAGE_ERRORS as error:
                # Still listed in Redis: the next process that starts with this KEY_PREFIX retries it.
                logger.warning("purge of generation %s interrupted: %s", generation or "(pending)", error)
            finally:
                if self.queue.empty():
                    self.idle.set()

    def purge(self, generation: str) -> int:
        removed = 0
        pattern = generation + ":*"
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
