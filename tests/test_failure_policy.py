"""A Redis outage makes reads miss and writes drop (logged, counted); FAILURE_POLICY='raise' raises."""

from __future__ import annotations

import logging
import socket

import pytest

from django_distcache.cache import CacheUnavailable
from tests.conftest import make_cache


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dead_location():
    return [f"redis://127.0.0.1:{_free_port()}"]


def test_outage_degrades_reads_to_miss_and_drops_writes(dead_location, caplog):
    cache = make_cache(LOCATION=dead_location)
    with caplog.at_level(logging.WARNING, logger="django_distcache"):
        assert cache.get("k", "default") == "default"
        cache.set("k", "v")  # dropped, no exception
        assert cache.add("k", "v") is False
        assert cache.get_many(["a", "b"]) == {}
        assert cache.set_many({"a": 1, "b": 2}) == ["a", "b"]  # Django's contract: the keys not stored
        assert cache.delete("k") is False
        assert cache.has_key("k") is False
        assert cache.get_or_set("k", lambda: "computed") == "computed"
        with pytest.raises(ValueError):
            cache.incr("k")  # an unreachable counter is a missing counter
    assert cache.failure_counts["get"] >= 2
    assert cache.failure_counts["set"] >= 1
    assert any("degraded" in record.message for record in caplog.records)


async def test_outage_degrades_async_too(dead_location):
    cache = make_cache(LOCATION=dead_location)
    assert await cache.aget("k", "default") == "default"
    await cache.aset("k", "v")
    assert await cache.aget_many(["a"]) == {}


def test_raise_policy_raises(dead_location):
    cache = make_cache(LOCATION=dead_location, OPTIONS={"FAILURE_POLICY": "raise"})
    with pytest.raises(CacheUnavailable):
        cache.get("k")
    with pytest.raises(CacheUnavailable):
        cache.set("k", "v")


def test_bad_input_still_raises_during_an_outage(dead_location):
    cache = make_cache(LOCATION=dead_location)
    with pytest.raises(TypeError):
        cache.set(1, "v")


def test_repeated_failures_are_all_counted_but_logged_once_per_interval(caplog):
    from django_distcache.core import FailurePolicy

    policy = FailurePolicy("miss")
    with caplog.at_level("WARNING", logger="django_distcache"):
        for number in range(50):
            policy.note("behind_unreplicated", "change %s reached 0 of 1 replicas", number)
            policy.handle("get", ConnectionError("down"), None)
    assert policy.counts == {"behind_unreplicated": 50, "get": 50}
    assert [record.getMessage() for record in caplog.records] == [
        "change 0 reached 0 of 1 replicas; 1 so far",
        "cache get failed (ConnectionError: down); degraded to None; 1 failures so far",
    ]
    policy._last_logged["get"] -= policy.LOG_EVERY  # the interval has passed for `get` only
    policy.handle("get", ConnectionError("down"), None)
    policy.note("behind_unreplicated", "change %s reached 0 of 1 replicas", 50)
    assert caplog.records[-1].getMessage().endswith("51 failures so far")
    assert len(caplog.records) == 3


def test_a_listener_that_raises_does_not_turn_a_degraded_call_into_an_error(caplog):
    """Listeners are the metrics hook: a bug in one is logged, and the call still degrades as configured."""
    from django_distcache.core import FailurePolicy

    policy = FailurePolicy("miss")
    heard = []
    policy.listeners.append(lambda what: 1 / 0)
    policy.listeners.append(heard.append)
    with caplog.at_level("ERROR", logger="django_distcache"):
        assert policy.handle("get", ConnectionError("down"), "fallback") == "fallback"
    assert policy.counts == {"get": 1} and heard == ["get"]
    assert any("failure listener raised" in record.getMessage() for record in caplog.records)
