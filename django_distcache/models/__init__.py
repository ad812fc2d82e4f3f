"""Model caching: read-through lookups (`get_cached`), write-through signals and write-behind."""

from .applied import BehindApplied
from .behind import (
    behind_metrics,
    dead_letters,
    flush_behind,
    incr_behind,
    purge_dead_letters,
    replay_dead_letters,
    save_behind,
)
from .read import aget_cached, get_cached
from .registry import cache_model, on_register
from .write_through import ainvalidate_model, connect_signals, invalidate_model

on_register(connect_signals)

__all__ = [
    "BehindApplied",
    "aget_cached",
    "ainvalidate_model",
    "behind_metrics",
    "cache_model",
    "dead_letters",
    "flush_behind",
    "get_cached",
    "incr_behind",
    "invalidate_model",
    "purge_dead_letters",
    "replay_dead_letters",
    "save_behind",
]
