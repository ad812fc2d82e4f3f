"""Settings for the example shop: a catalogue served through django_distcache on a local Redis Cluster.

Every knob is an environment variable so `make demo` and a developer's shell can share this one file.
"""

import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-insecure-key-for-the-distcache-example")
DEBUG = os.environ.get("DJANGO_DEBUG", "1").lower() in {"1", "true", "yes", "on"}
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_distcache",
    "catalogue",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def postgres_from_url(url: str) -> dict[str, object]:
    """Turn postgres://user:pass@host:port/name?opt=v into a DATABASES entry, sparing a dependency."""
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": dict(parse_qsl(parts.query)),
    }


DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL.startswith(("postgres://", "postgresql://")):
    DATABASES = {"default": postgres_from_url(DATABASE_URL)}
else:
    # DISTCACHE_EXAMPLE_DB: another SQLite file (tests/test_example_project.py uses a temporary one).
    SQLITE_PATH = os.environ.get("DISTCACHE_EXAMPLE_DB") or BASE_DIR / "db.sqlite3"
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": SQLITE_PATH}}

CACHES = {
    "default": {
        "BACKEND": "django_distcache.cache.RedisClusterCache",
        "LOCATION": os.environ.get(
            "DISTCACHE_LOCATION", "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002"
        ).split(","),
        # The namespace of the shop's keys and tags; a test run uses one of its own.
        "KEY_PREFIX": os.environ.get("DISTCACHE_KEY_PREFIX", "shop"),
        "TIMEOUT": 300,
    }
}

# Celery (shop/celery.py): its worker drains the write-behind view counts into the database every second.
# The broker is a plain Redis of its own (`make demo` starts one), not the cache's cluster.
CELERY_BROKER_URL = os.environ.get("DISTCACHE_BROKER_URL", "redis://127.0.0.1:7010/0")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django_distcache": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
