"""Celery tasks, named under the `django_distcache.` prefix. Found by `app.autodiscover_tasks()` because
`django_distcache` is an installed app; `beat_schedule()` gives the entries Celery beat needs."""

from __future__ import annotations

from typing import Any

from celery import shared_task


@shared_task(name="django_distcache.flush_behind", ignore_result=True)
def flush_behind_task(using: str = "default", shards: list[int] | None = None) -> dict[str, Any]:
    """Drain queued write-behind changes into the database (see docs/write-behind.md)."""
    from dataclasses import asdict

    from .models.behind import flush_behind

    return asdict(flush_behind(using=using, shards=shards))


def beat_schedule(every: float = 1.0, using: str = "default") -> dict[str, dict[str, Any]]:
    """Entries for `app.conf.beat_schedule`: drain write-behind every `every` seconds.

    Each run expires after `every` seconds, so a stopped worker does not find a pile of drains when it
    comes back (one drain does all the work)."""
    return {
        f"django_distcache.flush_behind[{using}]": {
            "task": "django_distcache.flush_behind",
            "schedule": every,
            "kwargs": {"using": using},
            "options": {"expires": max(every, 1.0)},
        }
    }


@shared_task(name="django_distcache.refresh", ignore_result=True)
def refresh_task(name: str, args: list[Any], kwargs: dict[str, Any], token: str | None = None) -> None:
    """Recompute one `@cached(refresh="celery")` entry that a reader found stale or due (XFetch), and
    release the lease the reader took for it (see docs/stampede.md)."""
    from .memoize import refresh_by_name

    refresh_by_name(name, args, kwargs, token)
