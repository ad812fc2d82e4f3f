"""Queueing this package's Celery tasks from the features that need them, by name.

The tasks live in tasks.py, which imports the features; a feature that queues one asks Celery's current
app for the registered task instead of importing tasks.py back. The app registers them when Django is
ready (apps.py imports tasks.py when Celery is installed), so `task_always_eager` and routing work as
for any task.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured

FLUSH_BEHIND = "django_distcache.flush_behind"
REFRESH = "django_distcache.refresh"
WARM = "django_distcache.warm"


def celery_installed() -> bool:
    try:
        import celery  # noqa: F401
    except ImportError:
        return False
    return True


def send(name: str, kwargs: dict[str, Any], **options: Any) -> None:
    """Queue the task `name` with `kwargs` on Celery's current app (ImportError without Celery)."""
    from celery import current_app

    task = current_app.tasks.get(name)
    if task is None:
        raise ImproperlyConfigured(
            f"the Celery task {name!r} is not registered: add 'django_distcache' to INSTALLED_APPS (its "
            "AppConfig registers the tasks) or import django_distcache.tasks in the Celery app's module"
        )
    task.apply_async(kwargs=kwargs, **options)
