"""How a key reaches a node. Only this package imports redis-py; the layers above speak in `Call`s.

A `Call` is one command aimed at the node that owns its key. `execute` runs one; `execute_batch` groups
many by node, writes every node's batch before reading any reply, and returns one result per call in order
(an exception object in place of a result that failed), so the caller decides what a failure means.
"""

from .base import OUTAGE_ERRORS, Call, NotAClusterError, PermissionRefusedError, SlotMap, is_outage
from .cluster import AsyncClusterTopology, ClusterTopology

__all__ = [
    "OUTAGE_ERRORS",
    "AsyncClusterTopology",
    "Call",
    "ClusterTopology",
    "NotAClusterError",
    "PermissionRefusedError",
    "SlotMap",
    "is_outage",
]
