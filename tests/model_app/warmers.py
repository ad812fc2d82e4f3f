"""Warmers of the test app, found by discovery (each installed app's `warmers` module is imported).

They live here, not in the tests, because Celery worker processes must find them too.
"""

import time

import django_distcache

from .models import Label, PageCounter, Product

NUMBERS = 3000
VALUE = b"x" * 200


@django_distcache.warmer("model-app-products", tags=["warmed-products"])
def products():
    """A QuerySet: every row cached under pk and slug, as get_cached would."""
    return Product.objects.order_by("pk")


@django_distcache.warmer("model-app-counters")
def counters():
    """A write-behind model's rows: a change still queued must survive warming."""
    return PageCounter.objects.all()


@django_distcache.warmer("model-app-label-names", timeout=300, tags=["label-names"])
def label_names():
    for label in Label.objects.order_by("pk"):
        yield f"label-name:{label.pk}", label.name


@django_distcache.warmer("model-app-numbers", timeout=300, tags=["numbers"])
def numbers():
    """Many small entries (200-byte values), for batching and for splitting into tasks."""
    for number in range(NUMBERS):
        yield f"number:{number}", VALUE


@django_distcache.warmer("model-app-squares", timeout=300)
def squares(chunk):
    """Takes its Chunk: each task computes only the squares it writes."""
    for number in chunk.take(range(1000)):
        yield f"square:{number}", number * number


@django_distcache.warmer("model-app-broken")
def broken():
    yield "broken:1", 1
    raise RuntimeError("this warmer is broken on purpose")


@django_distcache.warmer("model-app-heartbeat", timeout=60, schedule=1.0)
def heartbeat():
    """On a beat schedule: the beat test watches its key change."""
    yield "warm-heartbeat", time.time()
