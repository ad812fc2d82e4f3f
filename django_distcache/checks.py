"""System checks: `manage.py check` (and runserver, migrate) report a bad CACHES entry before traffic does."""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from .topology import OUTAGE_ERRORS, ClusterTopology, CommandError, NotAClusterError

# Entries and tag keys have a TTL (a tag key lives as long as the entries stamped with it, forever only if
# one of them was stored with timeout=None); the namespace key and write-behind streams have none. Under a
# volatile-* policy Redis evicts only keys with a TTL: an evicted tag key is safe (a missing tag means
# "invalid": the entries carrying it miss). Under allkeys-* it may evict the others too.
SAFE_POLICY_HINT = (
    "Set maxmemory-policy to volatile-lru or volatile-lfu: entries and tag keys (which have a TTL) are evicted, "
    "the namespace key and write-behind streams (which have none) are kept; an evicted tag key only makes the "
    "entries carrying it miss. Entries stored with timeout=None, and their tag keys, are not evictable then."
)

BACKEND = "django_distcache.cache.RedisClusterCache"
_HASH_TAG = re.compile(r"\{[^}]+\}")  # what Redis Cluster hashes instead of the whole key


def _our_caches() -> list[tuple[str, dict[str, Any]]]:
    return [
        (alias, params)
        for alias, params in getattr(settings, "CACHES", {}).items()
        if params.get("BACKEND") == BACKEND
    ]


@register(Tags.caches)
def check_caches(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    from .core import core_for

    messages: list[CheckMessage] = []
    for alias, _params in _our_caches():
        # Bad LOCATION/OPTIONS raise ImproperlyConfigured right here (and in Django's own cache checks).
        core = core_for(alias)
        topology = core.topology
        try:
            topology.refresh(force=True)
        except NotAClusterError as error:
            messages.append(
                Error(
                    f"CACHES[{alias!r}]: {error}",
                    hint="Point LOCATION at the nodes of a Redis Cluster (cluster-enabled yes).",
                    id="django_distcache.E002",
                )
            )
            continue
        except OUTAGE_ERRORS as error:
            messages.append(
                Error(
                    f"CACHES[{alias!r}]: the Redis Cluster at LOCATION is unreachable: {error}",
                    hint="Check LOCATION, that the cluster runs, and USERNAME/PASSWORD/TLS options. "
                    "Silence with SILENCED_SYSTEM_CHECKS if the cache may be down at deploy time.",
                    id="django_distcache.E003",
                )
            )
            continue
        if _HASH_TAG.search(core.key_prefix):
            messages.append(
                Warning(
                    f"CACHES[{alias!r}]: KEY_PREFIX {core.key_prefix!r} contains a hash tag, so every key of "
                    "this cache maps to one slot on one node",
                    hint="Remove the braces from KEY_PREFIX; put {...} in individual keys that must share a slot.",
                    id="django_distcache.W002",
                )
            )
        messages.extend(_eviction_policy_messages(alias, topology))
        slot_map = topology.state.slot_map
        if slot_map is not None and slot_map.covered < 16384:
            messages.append(
                Warning(
                    f"CACHES[{alias!r}]: only {slot_map.covered} of 16384 slots are served; "
                    "keys in the others will miss",
                    id="django_distcache.W001",
                )
            )
    return messages


def _eviction_policy_messages(alias: str, topology: ClusterTopology) -> list[CheckMessage]:
    policies = {}
    for node in topology.primaries():
        try:
            reply = topology.node_execute(node, "CONFIG", "GET", "maxmemory*")
        except CommandError:
            return []  # CONFIG is disabled on some managed services: nothing to check
        except OUTAGE_ERRORS:
            continue
        pairs = dict(reply) if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=False))
        policy = pairs.get(b"maxmemory-policy", pairs.get("maxmemory-policy"))
        limit = pairs.get(b"maxmemory", pairs.get("maxmemory", b"0"))
        if policy is not None and int(limit) > 0:  # no limit: Redis neither evicts nor refuses anything
            policies[str(node)] = policy.decode() if isinstance(policy, bytes) else str(policy)
    evicting = sorted(node for node, policy in policies.items() if policy.startswith("allkeys-"))
    refusing = sorted(node for node, policy in policies.items() if policy == "noeviction")
    messages: list[CheckMessage] = []
    if evicting:
        messages.append(
            Warning(
                f"CACHES[{alias!r}]: maxmemory-policy allkeys-* on {', '.join(evicting)} may evict keys that "
                "have no TTL: the namespace key (every entry of the KEY_PREFIX then misses at once) and "
                "write-behind streams (changes queued by save_behind are then lost)",
                hint=SAFE_POLICY_HINT,
                id="django_distcache.W003",
            )
        )
    if refusing:
        messages.append(
            Warning(
                f"CACHES[{alias!r}]: maxmemory-policy noeviction on {', '.join(refusing)}: when a node is full "
                "every write to it fails (dropped and counted by the failure policy)",
                hint=SAFE_POLICY_HINT,
                id="django_distcache.W004",
            )
        )
    return messages
