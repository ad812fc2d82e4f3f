"""Celery tasks, named under the `django_distcache.` prefix. Found by `app.autodiscover_tasks()` because
`django_distcache` is an installed app; `beat_schedule()` gives the entries Celery beat needs for the
write-behind drain, `warmer_beat_schedule()` those of the warmers that have a schedule."""

from __future__ import annotations

from typing import Any

from celery import shared_task


# Celery ships no type information: its decorator hides the functions' signatures from mypy.
@shared_task(name="django_distcache.flush_behind", ignore_result=True)  # type: ignore[untyped-decorator]
def flush_behind_task(using: str = "default", shards: list[int] | None = None) -> dict[str, Any]:
    """Drain queued write-behind changes into the database (see docs/write-behind.md)."""
    from dataclasses import asdict

    from .models.drain import flush_behind

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


@shared_task(name="django_distcache.refresh", ignore_result=True)  # type: ignore[untyped-decorator]
def refresh_task(name: str, args: list[Any], kwargs: dict[str, Any], token: str | None = None) -> None:
    """Recompute one `@cached(refresh="celery")` entry that a reader found stale or due (XFetch), and
    release the lease the reader took for it (see docs/stampede.md)."""
    from .memoize import refresh_by_name

    refresh_by_name(name, args, kwargs, token)


# Late acknowledgement: a chunk's message is acknowledged when the chunk has run, not when a worker takes
# it, so a worker killed with chunks running or prefetched leaves them unacknowledged for the broker to
# deliver again; a pool child that dies mid-chunk has its chunk put back at once (reject_on_worker_lost).
# Running a chunk twice writes the same entries, and a chunk of a followed run that is done already is
# skipped (warming.run_task).
@shared_task(  # type: ignore[untyped-decorator]
    name="django_distcache.warm", ignore_result=True, bind=True, acks_late=True, reject_on_worker_lost=True
)
def warm_task(
    self: Any,
    name: str,
    chunk_index: int = 0,
    chunk_count: int = 1,
    chunk_size: int = 1000,
    pks: list[Any] | None = None,
    run_id: str | None = None,
    using: str | None = None,
) -> dict[str, Any]:
    """Run the warmer `name`, or one chunk of it (see docs/warming.md): `manage.py warmcache --async`
    sends one of these per chunk and follows `run_id`'s progress; beat sends whole runs."""
    from dataclasses import asdict

    from .warming import run_task

    worker = getattr(self.request, "hostname", None) or ""
    return asdict(run_task(name, chunk_index, chunk_count, chunk_size, pks, run_id, using, worker))


def warmer_beat_schedule() -> dict[str, dict[str, Any]]:
    """Entries for `app.conf.beat_schedule`: every warmer registered with a `schedule`, run whole by one
    `django_distcache.warm` task each time. A run expires after one interval, so a stopped worker does
    not come back to a pile of identical runs. Warmers are discovered, so Django must be set up: in the
    usual Celery module, where it is not yet, call this from a `celery.signals.import_modules` receiver
    (docs/warming.md shows how)."""
    from datetime import timedelta

    from .warming import registered_warmers

    entries: dict[str, dict[str, Any]] = {}
    for entry in registered_warmers():
        if entry.schedule is None:
            continue
        options: dict[str, float] = {}
        if isinstance(entry.schedule, int | float | timedelta):
            seconds = (
                entry.schedule.total_seconds() if isinstance(entry.schedule, timedelta) else entry.schedule
            )
            options["expires"] = max(float(seconds), 1.0)
        entries[f"django_distcache.warm[{entry.name}]"] = {
            "task": "django_distcache.warm",
            "schedule": entry.schedule,
            "kwargs": {"name": entry.name},
            "options": options,
        }
    return entries
