"""How a key reaches a node. Only this package imports redis-py; the layers above speak in `Call`s.

A `Call` is one command aimed at the node that owns its key. `execute` runs one; `execute_batch` groups
many by node, writes every node's batch before reading any reply, and returns one result per call in order
(an exception object in place of a result that failed), so the caller decides what a failure means.
`CommandError` is a command's error reply (a bug, never an outage); `key_slot` is the slot of a key.
`ClusterTopology.subscribe` gives a pub/sub `Subscription` on a connection of its own.
"""

from redis.crc import key_slot
from redis.exceptions import ResponseError as CommandError

from .base import OUTAGE_ERRORS, Call, NotAClusterError, PermissionRefusedError, SlotMap, is_outage
from .cluster import AsyncClusterTopology, ClusterTopology
from .subscription import Message, Subscription

__all__ = [
    "OUTAGE_ERRORS",
    "AsyncClusterTopology",
    "Call",
    "CommandError",
    "ClusterTopology",
    "Message",
    "NotAClusterError",
    "PermissionRefusedError",
    "SlotMap",
    "Subscription",
    "is_outage",
    "key_slot",
]
