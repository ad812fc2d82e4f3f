"""One plan writes model entries: fills (`get_cached`, write-through), warming and the write-behind refresh.

Every write of a row's entries is the same four steps: read the current versions of the rows' tags (one
batch, before anything else: see the fill protocol in read.py), read the namespace generation once, encode
each row's payload under each of its keys, then write every key in one batch, each through a script that
decides on the node whether the write still may happen. What differs between the writers is that guard:

- `UnchangedSinceLease` (fills and warming): the key is written only if it still holds what the reader saw
  and no write-behind change of the row is queued (`scripts.SET_IF_UNCHANGED`), and nothing is written if a
  writer replaced the model's epoch since the lease;
- the write-behind refresh (drain.py): `scripts.REFRESH_DRAINED_ROW`, once per row and drained stream id.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from .. import scripts
from ..core import Core
from ..plans import PlanOf
from ..topology import Call
from .registry import ModelCacheConfig

logger = logging.getLogger("django_distcache.models")

C = TypeVar("C")


@dataclass(slots=True)
class RowEntries(Generic[C]):
    """One row's entries to write: `payload` under each of `keys`, stamped with the `known` tag versions
    and the current versions of `tags` (read by the plan, made to outlive `expiry_ms`)."""

    config: ModelCacheConfig
    keys: Mapping[str, str]  # {lookup: entry key}, made physical under the plan's namespace read
    payload: Any  # None: nothing to encode (the guard writes what it decides, e.g. a delete)
    tags: Sequence[str]
    known: Mapping[str, int]
    expiry_ms: int | None
    of: C  # what the guard needs of the row


@dataclass(slots=True)
class Target(Generic[C]):
    """One key to write: where, and the bytes (None: nothing encoded)."""

    row: RowEntries[C]
    physical: bytes
    data: bytes | None


class EntryGuard(Protocol[C]):
    """What decides whether and how each key is written."""

    def admits(self, core: Core, head: bytes, targets: list[Target[C]]) -> PlanOf[bool]:
        """Reads before the write; False writes nothing (the plan then returns None)."""
        ...

    def call(self, core: Core, head: bytes, target: Target[C]) -> Call | None:
        """The guarded write of one key; None writes nothing there."""
        ...


def write_entries_plan(
    core: Core, rows: Sequence[RowEntries[C]], guard: EntryGuard[C], *, skip_unencodable: bool = False
) -> PlanOf[list[tuple[Target[C], Any]] | None]:
    """Write `rows`' entries in one batch, each key through `guard`. Returns (target, reply) per key, rows in
    order (the reply is None where nothing was sent), or None if the guard refused the batch.

    A payload the cache's serializer cannot hold (JSON and a Decimal, say) raises, or with
    `skip_unencodable` is counted as `model_unencodable` and its row's keys are not written."""
    versions = yield from _tag_versions(core, rows)
    head = yield from core.namespace.current()
    targets = [target for row in rows for target in _encoded(core, row, head, versions, skip_unencodable)]
    if not (yield from guard.admits(core, head, targets)):
        return None
    calls = [guard.call(core, head, target) for target in targets]
    sent = [call for call in calls if call is not None]
    replies = iter((yield sent) if sent else ())
    return [
        (target, None if call is None else next(replies)) for target, call in zip(targets, calls, strict=True)
    ]


def _tag_versions(core: Core, rows: Sequence[RowEntries[Any]]) -> PlanOf[dict[str, int]]:
    """Current versions of the rows' tags, each tag key made to outlive the longest-lived entry carrying
    it: one batch when the rows share a timeout (one model), one per timeout otherwise."""
    longest: dict[str, int | None] = {}
    for row in rows:
        for tag in row.tags:
            if tag not in longest:
                longest[tag] = row.expiry_ms
            else:
                kept = longest[tag]
                longest[tag] = None if kept is None or row.expiry_ms is None else max(kept, row.expiry_ms)
    by_expiry: dict[int | None, list[str]] = {}
    for tag, expiry_ms in longest.items():
        by_expiry.setdefault(expiry_ms, []).append(tag)
    versions: dict[str, int] = {}
    for expiry_ms, tags in by_expiry.items():
        versions.update((yield from core.tags.for_write(tags, expiry_ms)))
    return versions


def _encoded(
    core: Core, row: RowEntries[C], head: bytes, versions: dict[str, int], skip_unencodable: bool
) -> list[Target[C]]:
    targets = [Target(row, core.physical_of(head, key), None) for key in row.keys.values()]
    if row.payload is None:
        return targets
    stamps = {**row.known, **{tag: versions[tag] for tag in row.tags}}
    try:
        for target, key in zip(targets, row.keys.values(), strict=True):
            target.data = core.encode(row.payload, key, target.physical, stamps)
    except (TypeError, ValueError) as error:
        if not skip_unencodable:
            raise
        core.failures.count("model_unencodable")
        logger.warning("%s rows cannot be cached with this cache's serializer: %s", row.config.label, error)
        for target in targets:
            target.data = None
    return targets


# -- fills and warming: compare-and-set under a lease ------------------------------------------------------
def observed_fingerprint(observed: bytes | None) -> str:
    return hashlib.sha1(observed).hexdigest() if observed is not None else "-"


@dataclass
class UnchangedSinceLease:
    """The fill protocol's guard (read.py): nothing is written if the model's epoch is no longer the
    lease's; each key only if it still holds what the reader saw (`observed`, by physical key; the others
    are read here) and, for a row given a patch key (`RowEntries.of`), only while no write-behind change
    of the row is queued. One per run: it keeps what it read."""

    epoch_key: bytes
    epoch: bytes | None
    observed: dict[bytes, bytes | None] = field(default_factory=dict)
    repairable: bool = False

    def admits(self, core: Core, head: bytes, targets: list[Target[str | None]]) -> PlanOf[bool]:
        written = [target for target in targets if target.data is not None]
        if not written:
            return False
        unseen = [target.physical for target in written if target.physical not in self.observed]
        if unseen:
            replies = yield [Call(physical, ("GET", physical)) for physical in unseen]
            for physical, reply in zip(unseen, replies, strict=True):
                if isinstance(reply, BaseException):
                    raise reply  # an outage: the driver's failure policy answers
                self.observed[physical] = reply
        # Read after the tags (the plan's first step): a writer replaces the epoch before the tags.
        return bool((yield Call(self.epoch_key, ("GET", self.epoch_key))) == self.epoch)

    def call(self, core: Core, head: bytes, target: Target[str | None]) -> Call | None:
        if target.data is None:
            return None
        patch = target.row.of
        script_keys = (
            (target.physical,) if patch is None else (target.physical, core.physical_of(head, patch))
        )
        expiry_ms = target.row.expiry_ms
        args = (
            "EVAL",
            scripts.SET_IF_UNCHANGED,
            len(script_keys),
            *script_keys,
            observed_fingerprint(self.observed.get(target.physical)),
            target.data,
            "" if expiry_ms is None else expiry_ms,
        )
        return Call(target.physical, args, idempotent=False, repairable=self.repairable)
