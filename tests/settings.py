"""Settings for the test suite: a local Redis Cluster started by tests/conftest.py, SQLite or PostgreSQL."""

import os
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.django_source import add_django_tests_to_path

add_django_tests_to_path()  # makes Django's own `cache` test app importable (conformance suite)


def _cluster_base_port() -> int:
    """The test cluster's first port: DISTCACHE_TEST_CLUSTER_PORT, or the first free block from 7300.

    A block is usable when none of its six ports answers, or when it is this checkout's own test cluster
    (its data dir exists). The choice is put in the environment so that child processes agree.
    """
    if os.environ.get("DISTCACHE_TEST_CLUSTER_PORT"):
        return int(os.environ["DISTCACHE_TEST_CLUSTER_PORT"])
    root = Path(__file__).resolve().parent.parent
    for base in range(7300, 7600, 10):
        ours = (root / ".devcluster" / f"test-{base}").exists()
        if ours or not any(_port_answers(base + offset) for offset in range(6)):
            os.environ["DISTCACHE_TEST_CLUSTER_PORT"] = str(base)
            return base
    raise RuntimeError("no free block of 6 ports between 7300 and 7600 for the test cluster")


def _port_answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


CLUSTER_BASE_PORT = _cluster_base_port()
CLUSTER_LOCATION = [f"redis://127.0.0.1:{CLUSTER_BASE_PORT + i}" for i in range(3)]

SECRET_KEY = "django-distcache-tests"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_distcache",
    "cache",
    "tests.versioned_app",
    "tests.model_app.apps.ModelAppConfig",
]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"


def _database() -> dict:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(url)
        name = parts.path.lstrip("/") or "test"
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            # One test database per test cluster: two runs on one server (two checkouts, two developers)
            # would otherwise create, use and drop the same `test_<name>` under each other.
            "TEST": {"NAME": f"test_{name}_{CLUSTER_BASE_PORT}"},
        }
    # A file, not ":memory:": the Celery worker process of the write-behind tests opens the same database.
    data_dir = Path(__file__).resolve().parent.parent / ".devcluster"
    data_dir.mkdir(exist_ok=True)
    test_file = str(data_dir / f"test-db-{CLUSTER_BASE_PORT}-{os.getpid()}.sqlite3")
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": test_file,
        "TEST": {"NAME": test_file},
        # IMMEDIATE: a transaction takes the write lock when it begins, so a writer waits for a lock held
        # elsewhere (the write-behind crash test holds one) instead of failing at its first write.
        "OPTIONS": {"timeout": 30, "transaction_mode": "IMMEDIATE"},
    }


DATABASES = {"default": _database()}
# A worker process started by the tests uses the test database the test run created (tests/conftest.py).
if os.environ.get("DISTCACHE_TEST_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["DISTCACHE_TEST_DB_NAME"]

CACHES = {
    "default": {
        "BACKEND": "django_distcache.cache.RedisClusterCache",
        "LOCATION": CLUSTER_LOCATION,
        "KEY_PREFIX": "tests",
        # Short takeover for the crash tests of write-behind; 4 shards keep drains quick.
        "OPTIONS": {"BEHIND_IDLE_TIMEOUT": 2.0, "BEHIND_SHARDS": 4, "BEHIND_MAX_ATTEMPTS": 3},
    }
}

# Celery: the broker is a standalone Redis the tests start (not the cluster), on the block's 9th port.
CELERY_BROKER_URL = f"redis://127.0.0.1:{CLUSTER_BASE_PORT + 8}/0"
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
