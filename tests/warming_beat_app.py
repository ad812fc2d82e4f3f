"""A Celery app laid out as docs/warming.md tells a project to: Django is not set up when this module is
imported (Celery's Django fixup does it), so the scheduled warmers are added to the beat schedule from the
`import_modules` signal, which fires after that and before beat reads its schedule. Used by the beat test
of tests/test_warming.py."""

import os

from celery import Celery
from celery.signals import import_modules

from django_distcache.tasks import warmer_beat_schedule

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("distcache_warm_beat")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.conf.beat_schedule = {}


@import_modules.connect(sender=app)
def add_scheduled_warmers(sender, **kwargs):
    sender.conf.beat_schedule.update(warmer_beat_schedule())
