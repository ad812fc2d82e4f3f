"""@cached functions that a test Celery worker must be able to import (refresh="celery")."""

import os

import django_distcache


@django_distcache.cached(timeout=0.5, stale=60, refresh="celery")
def computed_where(label):
    """Says which process computed it."""
    return f"{label}@{os.getpid()}"
