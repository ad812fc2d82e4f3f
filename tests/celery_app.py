"""The Celery app of the test worker process (and of the test process, to send tasks)."""

import os

import django
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

app = Celery("distcache_tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
