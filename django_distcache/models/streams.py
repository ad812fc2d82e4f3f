"""Where write-behind changes wait: one Redis Stream per shard, the keys next to it, and a change's signed form.

BEHIND_SHARDS streams, each with a hash tag chosen so that the shards' slots are spread evenly over the
16384 slots (so over the primaries). A row always maps to the same shard, so its changes stay in order.
Next to each stream, in its slot: the drain's lock, the failure counts of its changes and its counters.
Queueing (queue.py), draining (drain.py), dead letters and metrics all find their keys here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..core import Core
from ..keys import BEHIND_CHANGE_IDENTITY, KeyLayout
from ..plans import PlanOf
from ..topology import Call, key_slot

_SLOTS = 16384


class BehindError(Exception):
    """A write-behind request that cannot be queued as asked (the message says why)."""


# -- keys ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def shard_tags(count: int) -> tuple[str, ...]:
    """One hash tag per shard whose slot falls in the shard's 1/count of the slot space."""
    tags = []
    for shard in range(count):
        low, high = shard * _SLOTS // count, (shard + 1) * _SLOTS // count
        for attempt in range(1_000_000):
            tag = f"{shard}.{attempt}"
            if low <= key_slot(tag.encode()) < high:
                tags.append(tag)
                break
    return tuple(tags)


@dataclass(frozen=True)
class ShardKeys:
    stream: bytes
    lock: bytes
    attempts: bytes
    stats: bytes


def shard_count(core: Core) -> int:
    return core.settings.behind_shards


def shard_keys(core: Core, shard: int) -> ShardKeys:
    """A shard's stream, lock, failure counts and counters: `<KEY_PREFIX>:~behind:{<tag>}` and alike, in
    one slot."""
    return _shard_keys(core.keys, shard_count(core), shard)


@lru_cache(maxsize=1024)
def _shard_keys(layout: KeyLayout, count: int, shard: int) -> ShardKeys:
    tag = shard_tags(count)[shard]
    internal = layout.internal
    return ShardKeys(
        stream=internal(f"behind:{{{tag}}}"),
        lock=internal(f"behind-lock:{{{tag}}}"),
        attempts=internal(f"behind-attempts:{{{tag}}}"),
        stats=internal(f"behind-stats:{{{tag}}}"),
    )


def dead_letter_key(core: Core) -> bytes:
    return core.keys.internal("behind-dead")


def stats_key(core: Core) -> bytes:
    """Counters of earlier versions, which kept them in one key; still added into behind_metrics()."""
    return core.keys.internal("behind-stats")


def shard_of(core: Core, label: str, pk: Any) -> int:
    digest = hashlib.blake2b(f"{label}:{pk!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count(core)


# -- stream ids and entries ---------------------------------------------------------------------------
def id_text(stream_id: bytes | str) -> str:
    return stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)


def sortable_id(stream_id: bytes | str) -> str:
    """A stream id as text whose order is the stream's order."""
    millis, _, sequence = id_text(stream_id).partition("-")
    return f"{int(millis):020d}-{int(sequence or 0):020d}"


def stream_entries(reply: Any) -> list[tuple[bytes, bytes | None]]:
    """[(id, payload)] from an XRANGE reply."""
    result = []
    for item in reply or []:
        if not item:
            continue
        entry_id, fields = item[0], item[1]
        payload = None
        if fields:
            pairs = dict(zip(fields[::2], fields[1::2], strict=True))
            payload = pairs.get(b"c")
        result.append((entry_id, payload))
    return result


# -- a change's signed form ---------------------------------------------------------------------------
def encode_change(core: Core, change: dict[str, Any]) -> bytes:
    """A queued change is signed for what it is (not a cache entry, which could never pass for it) and for
    its KEY_PREFIX, not for one stream: replay_dead_letters moves it between streams."""
    try:
        return core.codec.encode(change, BEHIND_CHANGE_IDENTITY)
    except Exception as error:
        error.add_note("while encoding a write-behind change; nothing was queued")
        raise


def decode_change(core: Core, payload: bytes | None) -> dict[str, Any]:
    if payload is None:
        raise BehindError("the stream entry has no payload")
    change = core.codec.decode(payload, BEHIND_CHANGE_IDENTITY)
    if not isinstance(change, dict) or not {"model", "pk", "fields"} <= set(change):
        raise BehindError("the stream entry is not a write-behind change")
    if not isinstance(change["fields"], dict) or not isinstance(change.get("incr") or {}, dict):
        raise BehindError("the stream entry is not a write-behind change")
    return change


# -- strict I/O: the queue's operations never degrade to a silent no-op ---------------------------------
def one(call: Call) -> PlanOf[Any]:
    return (yield call)


def strict_call(core: Core, call: Call, operation: str = "flush_behind") -> Any:
    """One call; an outage raises CacheUnavailable whatever the failure policy."""
    return core.run_strict(one(call), operation)


def strict_batch(core: Core, calls: list[Call], operation: str = "flush_behind") -> list[Any]:
    """One batch; any failed call raises (an outage as CacheUnavailable)."""

    def plan() -> PlanOf[list[Any]]:
        return _checked((yield calls))

    return core.run_strict(plan(), operation)


def _checked(replies: Iterable[Any]) -> list[Any]:
    replies = list(replies)
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies
