"""The invalidation outbox: an invalidation that cannot reach its node is kept and retried, never dropped.

When `invalidate_tags` (or a model write-through, which invalidates the row's tag) cannot write a tag's
new version because the tag key's node is down, the new version goes here. Until it lands:

- every read of an entry that carries a pending tag is a miss (in this process: others learn of the
  invalidation when it lands, or never saw the old entry served past the outage's start if their copy
  of the tag's version had expired — see docs/failure.md for the exact guarantee);
- a background thread retries the writes (then pushes them to the other processes), oldest first.

The outbox is bounded (conf.OUTBOX_SIZE tags). When it overflows, the invalidations it could not keep are
replaced by a namespace bump (`clear()`): until the bump lands every tagged read is a miss, and the bump is
retried like the rest. Pending invalidations are also written to a small file per process (OUTBOX_DIR),
so that a process restarted before they landed has its namespace bumped at start, once the cluster
answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from .forksafe import process_alive, renew_locks_after_fork
from .plans import PlanOf, T
from .topology import Call, ClusterTopology, is_outage

logger = logging.getLogger("django_distcache.outbox")

RETRY_INTERVAL = 0.2  # seconds between two attempts to flush the outbox


class Outbox:
    """Pending tag versions of one KEY_PREFIX on one cluster."""

    def __init__(
        self,
        key_prefix: str,
        topology: ClusterTopology,
        limit: int,
        directory: Path | None,
        tag_key: Callable[[str], bytes],
        publish: Callable[[dict[str, int]], None],
        bump_namespace: Callable[[], None],
        count: Callable[[str], None] = lambda what: None,
    ) -> None:
        self.key_prefix = key_prefix
        self.topology = topology
        self.limit = limit
        self.directory = directory
        self.tag_key = tag_key
        self.publish = publish
        self.bump_namespace = bump_namespace
        self.count = count
        self.pending: dict[str, int] = {}
        self.changes = 0  # counted after every change of `pending`: what readers derive from it is renewed
        self.overflowed = False  # some invalidations were not kept: bump the namespace
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        renew_locks_after_fork(self, "_lock")
        self._recover_from_dead_processes()

    # -- what reads ask ----------------------------------------------------------------------------------
    def blocks(self, tags: Collection[str]) -> bool:
        """True if an entry carrying `tags` must be treated as a miss now."""
        if self.overflowed:
            return bool(tags)
        pending = self.pending
        return bool(pending) and any(tag in pending for tag in tags)

    @property
    def empty(self) -> bool:
        return not self.pending and not self.overflowed

    # -- queueing --------------------------------------------------------------------------------------
    def add(self, versions: dict[str, int]) -> None:
        with self._lock:
            for tag, version in versions.items():
                if tag in self.pending or len(self.pending) < self.limit:
                    self.pending[tag] = version
                else:
                    self.overflowed = True
            self.changes += 1
            self._save()
        for _ in versions:
            self.count("invalidate_tags_queued")
        logger.warning(
            "queued %d invalidation(s) for %s: their node is unreachable; entries carrying them miss "
            "until they land%s",
            len(versions),
            self.key_prefix,
            " (outbox full: the namespace will be bumped)" if self.overflowed else "",
        )
        self._ensure_retrying()

    def _ensure_retrying(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._retry_loop, name="distcache-outbox", daemon=True)
            self._thread.start()

    def _retry_loop(self) -> None:
        while not self.empty:
            time.sleep(RETRY_INTERVAL)
            try:
                self.flush()
            except Exception as error:  # noqa: BLE001 - keep retrying; a bug is logged, not lost
                logger.warning("outbox flush failed (%s: %s); retrying", type(error).__name__, error)

    def flush(self) -> bool:
        """Try to write every pending version (and the namespace bump); True when nothing is left."""
        if self.overflowed:
            try:
                self.bump_namespace()
            except Exception as error:  # noqa: BLE001 - an outage: retried by the loop
                if not is_outage(error) and not isinstance(error, ConnectionError):
                    logger.warning("namespace bump for the outbox failed: %s", error)
                return False
            with self._lock:
                self.overflowed = False
                self.pending.clear()  # a new namespace makes every older entry unreachable anyway
                self.changes += 1
                self._save()
            logger.warning("outbox of %s overflowed: bumped the namespace instead", self.key_prefix)
            return True
        with self._lock:
            batch = dict(self.pending)
        if not batch:
            return True
        # As invalidate_tags: a tag key that is gone (expired, evicted) stays gone, and its TTL is kept.
        calls = [
            Call(self.tag_key(tag), ("SET", self.tag_key(tag), version, "XX", "KEEPTTL"), repairable=True)
            for tag, version in batch.items()
        ]
        replies = self.topology.execute_batch(calls)
        landed: dict[str, int] = {}
        for (tag, version), reply in zip(batch.items(), replies, strict=True):
            if isinstance(reply, BaseException):
                continue
            landed[tag] = version
        if landed:
            with self._lock:
                for tag, version in landed.items():
                    if self.pending.get(tag) == version:
                        del self.pending[tag]
                self.changes += 1
                self._save()
            with contextlib.suppress(Exception):  # pushing is best effort: versions are re-read anyway
                self.publish(landed)
            logger.warning("%d queued invalidation(s) of %s landed", len(landed), self.key_prefix)
        return not self.pending

    # -- surviving a restart -------------------------------------------------------------------------------
    def _file(self) -> Path | None:
        if self.directory is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.key_prefix) or "_"
        return self.directory / f"{safe}.{os.getpid()}.json"

    def _save(self) -> None:
        path = self._file()
        if path is None:
            return
        try:
            if self.pending or self.overflowed:
                path.parent.mkdir(parents=True, exist_ok=True)
                data = {
                    "key_prefix": self.key_prefix,
                    "tags": sorted(self.pending),
                    "overflowed": self.overflowed,
                }
                temporary = path.with_suffix(".tmp")
                temporary.write_text(json.dumps(data))
                temporary.replace(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as error:
            logger.warning("cannot record the outbox in %s: %s", path, error)

    def _recover_from_dead_processes(self) -> None:
        """A process that died with invalidations pending left its file: bump the namespace for it."""
        if self.directory is None or not self.directory.is_dir():
            return
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.key_prefix) or "_"
        for path in self.directory.glob(f"{safe}.*.json"):
            try:
                pid = int(path.name[len(safe) + 1 : -len(".json")])
            except ValueError:
                continue
            if pid == os.getpid() or process_alive(pid):
                continue
            try:
                data: dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            if data.get("key_prefix", self.key_prefix) != self.key_prefix:
                continue
            logger.warning(
                "process %s stopped with %d invalidation(s) of %s not applied: the namespace will be bumped",
                pid,
                len(data.get("tags", [])),
                self.key_prefix,
            )
            with self._lock:
                self.overflowed = True
                self._save()
            with contextlib.suppress(OSError):
                path.unlink()
        if self.overflowed:
            self._ensure_retrying()


def run_plan(topology: ClusterTopology, plan: PlanOf[T]) -> T:
    """Drive a plan of plain calls with the sync topology (the outbox's thread has no core)."""
    try:
        request = next(plan)
        while True:
            reply = (
                topology.execute(request) if isinstance(request, Call) else topology.execute_batch(request)
            )
            request = plan.send(reply)
    except StopIteration as done:
        result: T = done.value
        return result
