"""The Celery app of the test worker process (and of the test process, to send tasks)."""

import os

import django
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

app = Celery("distcache_tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

from django_distcache.tasks import beat_schedule  # noqa: E402  (after django.setup())

app.conf.beat_schedule = beat_schedule(every=1.0)  # used by workers started with -B
