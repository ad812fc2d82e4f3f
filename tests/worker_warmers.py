"""A warmer that stops mid-chunk until the test lets it go on, for killing a Celery worker while a chunk
runs (tests/test_warming_worker.py). The test's workers import it with `celery worker -I`.

Split with `--tasks 3 --chunk-size 2`, chunk i owns blocks i and i + 3 of two items each: every chunk
writes its first block, then waits for the gate before its second, so a worker killed after a first
block was written is killed in the middle of a chunk, with the other chunks running or prefetched.
"""

import time

from django.core.cache import caches

import django_distcache

ITEMS = 12
FIRST_GATED = 6  # the first item of every chunk's second block
GATE_KEY = "worker-test:gate"
GATE_WAIT = 60.0


def item_key(number: int) -> str:
    return f"gated:{number}"


@django_distcache.warmer("worker-test-gated", timeout=300)
def gated(chunk):
    for number in chunk.take(range(ITEMS)):
        if number >= FIRST_GATED:
            deadline = time.monotonic() + GATE_WAIT
            while caches["default"].get(GATE_KEY) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("the test never opened the gate")
                time.sleep(0.05)
        yield item_key(number), number
