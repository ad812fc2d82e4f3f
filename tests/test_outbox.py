"""The invalidation outbox and the per-node breakers: pure logic, and the outbox against a dead node."""

from __future__ import annotations

import json
import os
import time

import pytest
from redis.cluster import RedisCluster

from django_distcache.outbox import Outbox
from django_distcache.topology.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from tests.conftest import tag_keys


def test_a_breaker_opens_after_the_threshold_and_probes_after_the_cooldown():
    breaker = Breaker("n1", threshold=3, cooldown=0.1)
    error = ConnectionError("refused")
    assert breaker.allow()
    assert not breaker.failure(error) and not breaker.failure(error)
    assert breaker.failure(error) and breaker.state == OPEN
    assert not breaker.allow()  # fails fast, no I/O
    time.sleep(0.12)
    assert breaker.allow() and breaker.state == HALF_OPEN  # one probe...
    assert not breaker.allow()  # ...at a time
    breaker.failure(error)
    assert breaker.state == OPEN
    time.sleep(0.12)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow()


def test_a_success_resets_the_count_of_failures():
    breaker = Breaker("n1", threshold=2, cooldown=1)
    breaker.failure(TimeoutError())
    breaker.success()
    assert not breaker.failure(TimeoutError())
    assert breaker.state == CLOSED


class _DeadTopology:
    def __init__(self):
        self.alive = False
        self.written = {}

    def execute_batch(self, calls):
        if not self.alive:
            return [ConnectionError("down") for _ in calls]
        for call in calls:
            self.written[call.args[1]] = call.args[2]
        return [True for _ in calls]


def _outbox(tmp_path, topology, limit=10, bumps=None, prefix="p"):
    return Outbox(
        prefix,
        topology,
        limit,
        tmp_path,
        lambda tag: f"tag:{tag}".encode(),
        lambda landed: None,
        (lambda: bumps.append(1)) if bumps is not None else (lambda: None),
    )


def test_pending_invalidations_block_reads_until_they_land(tmp_path):
    topology = _DeadTopology()
    outbox = _outbox(tmp_path, topology)
    outbox.add({"a": 1})
    assert outbox.blocks(["a", "b"]) and not outbox.blocks(["b"])
    assert json.loads(next(tmp_path.glob("p.*.json")).read_text())["tags"] == ["a"]
    assert outbox.flush() is False  # the node is still down: kept
    topology.alive = True
    deadline = time.monotonic() + 5
    while not outbox.empty:  # the background thread retries
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert topology.written == {b"tag:a": 1}
    assert not outbox.blocks(["a"]) and not list(tmp_path.glob("p.*.json"))


def test_an_overflowing_outbox_bumps_the_namespace_and_blocks_every_tagged_read(tmp_path):
    bumps = []
    outbox = _outbox(tmp_path, _DeadTopology(), limit=2, bumps=bumps)
    outbox.add({"a": 1, "b": 2, "c": 3})
    assert outbox.overflowed and outbox.blocks(["anything"]) and not outbox.blocks([])
    deadline = time.monotonic() + 5
    while outbox.overflowed:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert bumps and outbox.empty


def test_a_process_that_died_with_pending_invalidations_gets_its_namespace_bumped(tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's default pid_max: never a live process
    (tmp_path / f"p.{dead_pid}.json").write_text(
        json.dumps({"key_prefix": "p", "tags": ["a"], "overflowed": False})
    )
    (tmp_path / f"other.{dead_pid}.json").write_text(json.dumps({"key_prefix": "other", "tags": ["a"]}))
    (tmp_path / f"p.{os.getpid()}.json").write_text(json.dumps({"key_prefix": "p", "tags": ["live"]}))
    bumps = []
    outbox = _outbox(tmp_path, _DeadTopology(), bumps=bumps)
    deadline = time.monotonic() + 5
    while not bumps:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not (tmp_path / f"p.{dead_pid}.json").exists()
    assert (tmp_path / f"other.{dead_pid}.json").exists()  # another prefix's: not ours to act on
    assert outbox.empty


# -- against the real cluster -------------------------------------------------------------------------------
@pytest.fixture
def raw(cluster):
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


def test_an_invalidation_queued_in_the_outbox_creates_no_key_when_it_lands(cache, raw, cluster):
    cache.set("k", "v", timeout=100, tags=["carried"])
    outbox = cache.core.tags.outbox
    outbox.add({"carried": 1234, "never-written": 5678})  # as if their node had been unreachable
    assert cache.get("k") is None  # pending: a miss in this process
    deadline = time.monotonic() + 10
    while not outbox.empty:
        assert time.monotonic() < deadline, "the outbox did not land"
        time.sleep(0.02)
    assert tag_keys(cluster, cache) == {cache.core.tags.tag_key("carried")}
    assert int(raw.get(cache.core.tags.tag_key("carried"))) == 1234
    assert 100_000 - 15_000 <= raw.pttl(cache.core.tags.tag_key("carried")) <= 160_000  # TTL kept
    assert cache.get("k") is None
