"""Write-behind metrics: backlog and lag per shard, and the counters the drains keep (drain.py)."""

from __future__ import annotations

import time
from typing import Any

from ..core import core_for
from ..topology import Call
from .streams import dead_letter_key, shard_count, shard_keys, stats_key, strict_batch


def _add_counters(stats: dict[str, float], raw: Any) -> None:
    pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    for name, value in pairs:
        key = name.decode()
        stats[key] = stats.get(key, 0.0) + float(value)


def _lag_seconds(first: Any, now_ms: float) -> float:
    """Age of the oldest entry of a stream (from its XRANGE ... COUNT 1)."""
    if not first:
        return 0.0
    millis = int(first[0][0].split(b"-")[0])
    return max(0.0, (now_ms - millis) / 1000)


def behind_metrics(using: str = "default") -> dict[str, Any]:
    """Backlog per shard, lag (age of the oldest change not yet applied), applied/s, coalescing ratio."""
    core = core_for(using)
    count = shard_count(core)
    now_ms = time.time() * 1000
    calls = []
    for shard in range(count):
        keys = shard_keys(core, shard)
        calls += [
            Call(keys.stream, ("XLEN", keys.stream)),
            Call(keys.stream, ("XRANGE", keys.stream, "-", "+", "COUNT", 1)),
            Call(keys.stats, ("HGETALL", keys.stats)),
        ]
    calls.append(Call(stats_key(core), ("HGETALL", stats_key(core))))
    calls.append(Call(dead_letter_key(core), ("XLEN", dead_letter_key(core))))
    replies = strict_batch(core, calls, "behind_metrics")
    stats: dict[str, float] = {}
    shards = []
    for shard in range(count):
        backlog, first, counters = replies[3 * shard : 3 * shard + 3]
        shards.append({"shard": shard, "backlog": int(backlog), "lag_seconds": _lag_seconds(first, now_ms)})
        _add_counters(stats, counters or {})
    _add_counters(stats, replies[-2] or {})
    applied = stats.get("changes_applied", 0.0)
    rows = stats.get("rows_written", 0.0)
    seconds = stats.get("apply_seconds", 0.0)
    return {
        "shards": shards,
        "backlog": sum(s["backlog"] for s in shards),
        "lag_seconds": max([0.0, *(s["lag_seconds"] for s in shards)]),
        "changes_applied": int(applied),
        "rows_written": int(rows),
        "batches": int(stats.get("batches", 0)),
        "applied_per_second": applied / seconds if seconds else 0.0,
        "coalescing_ratio": applied / rows if rows else 0.0,
        "dead_letters": int(replies[-1]),
    }
