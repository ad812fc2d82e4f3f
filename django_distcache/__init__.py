"""django-distcache: a Django cache on Redis Cluster that survives real traffic."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ gives, for type checkers
    from .memoize import cached as cached
    from .models import aget_cached as aget_cached
    from .models import ainvalidate_model as ainvalidate_model
    from .models import behind_metrics as behind_metrics
    from .models import cache_model as cache_model
    from .models import flush_behind as flush_behind
    from .models import get_cached as get_cached
    from .models import incr_behind as incr_behind
    from .models import invalidate_model as invalidate_model
    from .models import save_behind as save_behind
    from .views import cached_view as cached_view
    from .warming import page_warmer as page_warmer
    from .warming import run_warmer as run_warmer
    from .warming import warm_queryset as warm_queryset
    from .warming import warmer as warmer

__version__ = "0.1.0.dev0"

# Model caching needs Django's ORM, which must not be imported while settings are being read (the
# backend module is imported from CACHES); these names are imported on first use instead.
_MODEL_API = {
    "cache_model",
    "get_cached",
    "aget_cached",
    "invalidate_model",
    "ainvalidate_model",
    "save_behind",
    "incr_behind",
    "flush_behind",
    "behind_metrics",
}
# Warming imports the ORM too (QuerySet warmers), so its names are loaded the same way.
_WARMING_API = {"warmer", "page_warmer", "run_warmer", "warm_queryset"}


def __getattr__(name: str) -> Any:
    if name == "cached":
        from .memoize import cached

        return cached
    if name == "cached_view":
        from .views import cached_view

        return cached_view
    if name in _MODEL_API:
        from . import models

        return getattr(models, name)
    if name in _WARMING_API:
        from . import warming

        return getattr(warming, name)
    raise AttributeError(f"module 'django_distcache' has no attribute {name!r}")


def invalidate_tags(*tags: str, using: str = "default") -> int:
    """Invalidate every entry carrying any of `tags` in the cache `using` (a RedisClusterCache alias)."""
    from .core import core_for

    core = core_for(using)
    return int(core.run_strict(core.invalidate_tags_plan(tags), "invalidate_tags"))


async def ainvalidate_tags(*tags: str, using: str = "default") -> int:
    from .core import core_for

    core = core_for(using)
    return int(await core.arun_strict(core.invalidate_tags_plan(tags), "invalidate_tags"))
