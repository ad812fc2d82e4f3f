"""Test fixtures: one real local Redis Cluster for the whole session, and caches isolated per test."""

from __future__ import annotations

import os
import signal
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings
from hypothesis import settings as hypothesis_settings

from django_distcache.devcluster import DevCluster

ROOT = Path(__file__).resolve().parent.parent

# Property tests assert what holds for every input, never how fast one example runs: on a machine whose
# cores are busy with other work, Hypothesis's default 200 ms deadline per example fails them at random.
hypothesis_settings.register_profile("distcache", deadline=None)
hypothesis_settings.load_profile("distcache")


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
    _settle_outbox()
    yield dev
    if not already_running and not os.environ.get("DISTCACHE_KEEP_CLUSTER"):
        # The invalidation channels' threads are told to stop first: a cluster going down under them
        # would be an outage to report, and this is a deliberate shutdown.
        from django_distcache.backplane import stop_all

        stop_all()
        dev.down()


@pytest.fixture(scope="session", autouse=True)
def celery_app():
    """The suite's Celery app (tests/celery_app.py) as Celery's default app, from the first test on.

    Tasks are shared tasks: in a thread where no app was made current (a command run in a thread, the
    write-behind backlog trigger of a writer thread), Celery falls back to its default app. Without this,
    the first app to become default is whichever is made or first needed: another test's app on another
    broker database, or Celery's own fallback (amqp://localhost, where no test worker listens)."""
    from tests.celery_app import app

    app.set_default()
    return app


def _settle_outbox() -> None:
    """A test process that was killed (a peer, a worker, an interrupted run) with invalidations pending
    leaves its outbox file; the next process with the same KEY_PREFIX bumps the namespace for it, in the
    background, soon after its first use of the cache. Let that happen before the first test, not in the
    middle of one (where it would empty the cache under the test's feet)."""
    from django.core.cache import caches

    outbox = caches["default"].core.tags.outbox
    deadline = time.monotonic() + 30
    while outbox is not None and not outbox.empty:
        assert time.monotonic() < deadline, "the outbox left by an earlier test process never landed"
        time.sleep(0.05)


def wait_replicas_listed(cluster: DevCluster, timeout: float = 20) -> None:
    """Until CLUSTER SLOTS lists a replica for every slot range. Redis lists a replica only once its
    primary has seen it acknowledge part of the replication stream, so on a fresh cluster each primary is
    written to first."""
    import redis
    from redis.crc import key_slot

    deadline = time.monotonic() + timeout
    while True:
        ranges = redis.Redis(port=cluster.ports[0]).execute_command("CLUSTER", "SLOTS")
        if ranges and all(len(entry) > 3 for entry in ranges):
            return
        assert time.monotonic() < deadline, f"replicas still not listed by CLUSTER SLOTS: {ranges}"
        for start, end, primary, *_ in ranges:
            key = next(
                f"replication-ping-{n}"
                for n in range(100_000)
                if start <= key_slot(f"replication-ping-{n}".encode()) <= end
            )
            redis.Redis(port=primary[1]).set(key, 1, ex=60)
        time.sleep(0.1)


@contextmanager
def hung_primary(cluster: DevCluster, port: int):
    """SIGSTOP the primary on `port` (a hung node) while every other node is told not to take over, so
    that its slots stay its own, unreachable, for the whole block; SIGCONT and a healthy cluster after."""
    import redis

    others = [other for other in cluster.ports if other != port]
    for other in others:
        redis.Redis(port=other).config_set("cluster-replica-no-failover", "yes")
    pid = cluster.pid(port)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        for other in others:
            redis.Redis(port=other).config_set("cluster-replica-no-failover", "no")
        cluster.wait_healthy(60)
        # Caches of the tests that follow opened their breaker on the node: past the default cooldown, their
        # next call probes it and closes it.
        time.sleep(1.1)


def wait_for_backplane(cache, timeout: float = 10.0) -> None:
    """Until `cache`'s invalidation channel is subscribed (one per KEY_PREFIX, started at its first use)."""
    cache.core.backplane.ensure_started()
    deadline = time.monotonic() + timeout
    while not cache.core.backplane.connected:
        assert time.monotonic() < deadline, "the invalidation channel did not come up"
        time.sleep(0.01)


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


def tag_keys(cluster: DevCluster, cache) -> set[bytes]:
    """Every tag key of `cache`'s KEY_PREFIX on the cluster: a SCAN of every primary."""
    import redis

    found = set()
    for port in cluster.ports:
        node = redis.Redis(port=port)
        try:
            if node.info("replication")["role"] == "master":
                found.update(node.scan_iter(match=cache.core.tags.prefix + b"*", count=1000))
        finally:
            node.close()
    return found


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


class Worker:
    """A real Celery worker process (tests/celery_app.py) on the test broker, database and cluster."""

    def __init__(self, name: str, beat: bool = False) -> None:
        import subprocess
        import sys

        from django.db import connection

        self.log_path = ROOT / ".devcluster" / f"worker-{settings.CLUSTER_BASE_PORT}-{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        env["DISTCACHE_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
        env["DISTCACHE_TEST_CLUSTER_PORT"] = str(settings.CLUSTER_BASE_PORT)
        command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-P", "solo",
                   "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
                   "-l", "info"]  # fmt: skip
        if beat:
            command += ["-B", "-s", str(ROOT / ".devcluster" / f"beat-{settings.CLUSTER_BASE_PORT}")]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while "ready." not in self.log_path.read_text(errors="replace"):
            assert self.process.poll() is None, f"the worker exited: {self.log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"the worker is not ready: {self.log_path.read_text()[-3000:]}"
            )
            time.sleep(0.1)

    def kill(self) -> None:
        import signal

        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except Exception:  # noqa: BLE001 - a worker that does not stop in time is killed
                self.process.kill()
                self.process.wait(5)
        self.log.close()


@pytest.fixture(scope="session")
def broker():
    """A standalone Redis as the Celery broker (not the cluster), started by the dev tooling."""
    from django_distcache.devcluster import StandaloneServer

    server = StandaloneServer(
        settings.CLUSTER_BASE_PORT + 8, ROOT / ".devcluster" / f"broker-{settings.CLUSTER_BASE_PORT}"
    )
    already_running = server.pid() is not None
    server.up()
    yield server
    if not already_running and not os.environ.get("DISTCACHE_KEEP_CLUSTER"):
        server.down()


@pytest.fixture
def start_worker(broker, transactional_db):
    """start_worker(name, beat=False) -> a ready Worker; every worker is stopped after the test."""
    import redis

    import tests.celery_app  # noqa: F401  (this process sends tasks through the same app and broker)

    redis.Redis.from_url(broker.url).flushdb()  # no task of an earlier test is left for this test's workers
    workers = []

    def start(name: str = "w1", beat: bool = False, wait: bool = True) -> Worker:
        worker = Worker(name, beat)
        workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop()
