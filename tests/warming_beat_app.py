"""The test Celery app with the warmers' beat schedule added: for the worker of the beat test in
tests/test_warming.py (tests/celery_app.py keeps its own schedule, the write-behind drain only)."""

from django_distcache.tasks import warmer_beat_schedule
from tests.celery_app import app

app.conf.beat_schedule = warmer_beat_schedule()  # django.setup() ran in tests.celery_app

__all__ = ["app"]
