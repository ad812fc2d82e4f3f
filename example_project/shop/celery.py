"""The shop's Celery app: its worker runs django_distcache's write-behind drain on a beat schedule.

    celery -A shop worker -B -l info    (from example_project/; `make demo` starts one)

Configured from the Django settings whose names start with CELERY_ (the broker: DISTCACHE_BROKER_URL).
"""

import os

from celery import Celery

from django_distcache.tasks import beat_schedule

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

app = Celery("shop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()  # finds django_distcache.tasks, as django_distcache is an installed app
app.conf.beat_schedule = beat_schedule()  # flush_behind every second
