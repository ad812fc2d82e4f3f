"""Another process using the same cache: the tests drive it over stdin/stdout, one JSON line per request.

    python -m tests.peer <KEY_PREFIX> <option JSON>
A request is ["get", key], ["stampede", ...] (see _stampede), ["stats"] or ["rss"] (the peak resident
memory so far, in KiB); each answer is one JSON line.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import django
    from django.conf import settings

    from tests.settings import CLUSTER_LOCATION

    key_prefix, options = sys.argv[1], json.loads(sys.argv[2])
    settings.configure(
        SECRET_KEY="django-distcache-tests",
        CACHES={
            "default": {
                "BACKEND": "django_distcache.cache.RedisClusterCache",
                "LOCATION": CLUSTER_LOCATION,
                "KEY_PREFIX": key_prefix,
                "OPTIONS": options,
            }
        },
    )
    django.setup()
    from django.core.cache import cache

    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request[0] == "get":
            answer = cache.get(request[1], "<miss>")
        elif request[0] == "stampede":
            answer = _stampede(cache, *request[1:])
        elif request[0] == "stats":
            backplane = cache.core.backplane
            answer = {"connected": backplane.connected, "held_tags": cache.core.tags.held_count()}
        elif request[0] == "rss":
            import resource

            answer = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        else:
            answer = f"unknown request {request!r}"
        print(json.dumps(answer), flush=True)


def _stampede(cache, key, counter_key, threads, start_at, loader_seconds):
    """`threads` threads call get_or_set(key) at wall-clock `start_at`; the loader counts its calls in
    `counter_key` (shared by every process) and takes `loader_seconds`."""
    import threading
    import time

    def loader():
        cache.incr(counter_key)
        time.sleep(loader_seconds)
        return "computed"

    results = []

    def call():
        time.sleep(max(0.0, start_at - time.time()))
        results.append(cache.get_or_set(key, loader, timeout=60))

    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


if __name__ == "__main__":
    main()
