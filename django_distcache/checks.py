"""System checks: `manage.py check` (and runserver, migrate) report a bad CACHES entry before traffic does."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from .topology import OUTAGE_ERRORS, NotAClusterError

BACKEND = "django_distcache.cache.RedisClusterCache"


def _our_caches() -> list[tuple[str, dict[str, Any]]]:
    return [
        (alias, params)
        for alias, params in getattr(settings, "CACHES", {}).items()
        if params.get("BACKEND") == BACKEND
    ]


@register(Tags.caches)
def check_caches(app_configs: Any = None, **kwargs: Any) -> list:
    from django.core.cache import caches

    messages: list = []
    for alias, _params in _our_caches():
        # Bad LOCATION/OPTIONS raise ImproperlyConfigured right here (and in Django's own cache checks).
        cache = caches[alias]
        topology = cache._shared.topology
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
        if "{" in cache.key_prefix and "}" in cache.key_prefix.split("{", 1)[1]:
            messages.append(
                Warning(
                    f"CACHES[{alias!r}]: KEY_PREFIX {cache.key_prefix!r} contains a hash tag, so every key of "
                    "this cache maps to one slot on one node",
                    hint="Remove the braces from KEY_PREFIX; put {...} in individual keys that must share a slot.",
                    id="django_distcache.W002",
                )
            )
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
