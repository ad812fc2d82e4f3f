"""Model caching: read-through lookups (`get_cached`), write-through signals and write-behind.

read.py (lookups and the fill protocol), fill.py (the one plan that writes model entries), registry.py
(`cache_model`), write_through.py; write-behind: queue.py (`save_behind`, `incr_behind`), patch.py (what
readers lay over a row), drain.py (`flush_behind`), dead_letter_stream.py, metrics.py, streams.py (their keys).
"""

from .applied import BehindApplied
from .dead_letter_stream import dead_letters, purge_dead_letters, replay_dead_letters
from .drain import flush_behind
from .metrics import behind_metrics
from .queue import incr_behind, save_behind
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
