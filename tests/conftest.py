"""Test fixtures: one real local Redis Cluster for the whole session, and caches isolated per test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from django_distcache.devcluster import DevCluster

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def cluster() -> DevCluster:
    """The session's cluster (3 primaries + 3 replicas); started here, stopped at the end of the run."""
    dev = DevCluster(
        base_port=settings.CLUSTER_BASE_PORT,
        data_dir=ROOT / ".devcluster" / f"test-{settings.CLUSTER_BASE_PORT}",
        node_timeout=1000,
    )
    already_running = dev.is_healthy()
    dev.up()
    yield dev
    if not already_running and not os.environ.get("DISTCACHE_KEEP_CLUSTER"):
        dev.down()


def make_cache(**overrides):
    """A RedisClusterCache with a key prefix of its own, so tests never see each other's keys."""
    from django_distcache.cache import RedisClusterCache

    params = {"KEY_PREFIX": f"t-{uuid.uuid4().hex[:12]}", "TIMEOUT": 300}
    options = overrides.pop("OPTIONS", {})
    location = overrides.pop("LOCATION", settings.CLUSTER_LOCATION)
    params.update(overrides)
    params["OPTIONS"] = options
    return RedisClusterCache(location, params)


@pytest.fixture
def cache():
    return make_cache()
