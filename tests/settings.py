"""Settings for the test suite: a local Redis Cluster started by tests/conftest.py, SQLite or PostgreSQL."""

import os
from urllib.parse import unquote, urlsplit

from tests.django_source import add_django_tests_to_path

add_django_tests_to_path()  # makes Django's own `cache` test app importable (conformance suite)

CLUSTER_BASE_PORT = int(os.environ.get("DISTCACHE_TEST_CLUSTER_PORT", "7300"))
CLUSTER_LOCATION = [f"redis://127.0.0.1:{CLUSTER_BASE_PORT + i}" for i in range(3)]

SECRET_KEY = "django-distcache-tests"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_distcache",
    "cache",
    "tests.versioned_app",
]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"


def _database() -> dict:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(url)
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/") or "test",
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }
    return {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}


DATABASES = {"default": _database()}

CACHES = {
    "default": {
        "BACKEND": "django_distcache.cache.RedisClusterCache",
        "LOCATION": CLUSTER_LOCATION,
        "KEY_PREFIX": "tests",
    }
}
