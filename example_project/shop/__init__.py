# Loaded with Django, so that tasks sent from the shop (incr_behind's backlog trigger) go to its broker.
from .celery import app as celery_app

__all__ = ["celery_app"]
