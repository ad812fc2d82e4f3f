"""django-distcache: a Django cache on Redis Cluster that survives real traffic."""

__version__ = "0.1.0.dev0"


def invalidate_tags(*tags: str, using: str = "default") -> int:
    """Invalidate every entry carrying any of `tags` in the cache `using` (a RedisClusterCache alias)."""
    from django.core.cache import caches

    return caches[using].invalidate_tags(*tags)


async def ainvalidate_tags(*tags: str, using: str = "default") -> int:
    from django.core.cache import caches

    return await caches[using].ainvalidate_tags(*tags)
