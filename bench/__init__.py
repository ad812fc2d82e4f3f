"""Benchmarks of django_distcache against raw redis-py, django-redis and Django's own Redis cache.

Run everything with ``python -m bench.run_all`` (``make bench``), or one script with e.g.
``python -m bench.bench_backend``. Every script starts its own Redis Cluster (base port 7400) and its own
standalone Redis (base port + 9), and stops both when it ends, also on Ctrl-C or error.
"""
