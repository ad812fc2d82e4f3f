"""Django settings of the write-behind chaos run (bench/behind_chaos.py) and of its drainer processes.

Everything that differs between runs comes in one environment variable, DISTCACHE_CHAOS_BEHIND (JSON: the
cluster's URLs, the key prefix, the database, the write-behind options), so the drainer processes the run
starts see exactly the cache, database and models the writers see.
"""

import json
import os

_RUN = json.loads(os.environ["DISTCACHE_CHAOS_BEHIND"])

SECRET_KEY = _RUN["secret_key"]
USE_TZ = True
# The test app: PageCounter, a write-behind model with a counter (views) and a unique field (code).
INSTALLED_APPS = ["django_distcache", "tests.model_app.apps.ModelAppConfig"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
DATABASES = {"default": _RUN["database"]}
CACHES = {
    "default": {
        "BACKEND": "django_distcache.cache.RedisClusterCache",
        "LOCATION": _RUN["location"],
        "KEY_PREFIX": _RUN["key_prefix"],
        "TIMEOUT": 300,
        "OPTIONS": _RUN["options"],
    }
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # The drains' warnings (a lost lock, a database that refused) are part of what the run shows.
    "root": {"handlers": ["console"], "level": "ERROR"},
}
