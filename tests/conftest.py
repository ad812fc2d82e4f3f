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


class Peer:
    """A second process with its own cache instance (tests/peer.py), for cross-process guarantees."""

    def __init__(self, key_prefix: str, options: dict | None = None) -> None:
        import json
        import subprocess
        import sys

        self._json = json
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.peer", key_prefix, json.dumps(options or {})],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._read() == "ready"

    def _read(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the peer process exited")
        return self._json.loads(line)

    def ask(self, *request):
        self.process.stdin.write(self._json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def get(self, key):
        answer = self.ask("get", key)
        return None if answer == "<miss>" else answer

    def wait_for_miss(self, key, within: float) -> float:
        """Seconds until the peer first misses `key`; fails if it still hits after `within` + 1 s."""
        import time

        started = time.monotonic()
        while self.ask("get", key) != "<miss>":
            assert time.monotonic() - started < within + 1.0, f"peer still returns {key!r}"
            time.sleep(0.005)
        return time.monotonic() - started

    def wait_connected(self, timeout: float = 10.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        self.get("warm-up")  # the first read starts the subscription
        while not self.ask("stats")["connected"]:
            assert time.monotonic() < deadline, "the peer's invalidation channel did not come up"
            time.sleep(0.02)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.stdin.close()
        self.process.wait(10)
