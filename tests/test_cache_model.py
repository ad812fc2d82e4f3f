"""The backend against Django's LocMemCache as a model: random sequences of calls, good and bad, give the
same answers, and a call that raises leaves Redis exactly as it was (nothing half written)."""

from __future__ import annotations

import math
import threading
import uuid

import pytest
from django.conf import settings
from django.core.cache.backends.locmem import LocMemCache
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from redis.cluster import RedisCluster

from tests.conftest import make_cache

pytestmark = pytest.mark.filterwarnings("ignore::django.core.cache.backends.base.CacheKeyWarning")

KEYS = st.sampled_from(["a", "b", "c", "ключ", "{slot}x", "with space"])
VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.floats(allow_nan=False),
    st.none(),
)
TIMEOUTS = st.sampled_from([None, 300, 3600.5, 0, -1])
# What a caller may get wrong; every one of these must raise, and write nothing.
BAD_KEYS = st.sampled_from([42, None, b"bytes", "lone\ud800surrogate", ("tuple",)])
BAD_TIMEOUTS = st.sampled_from([float("nan"), "60", [1], True])
BAD_VALUES = st.sampled_from([lambda: None, threading.Lock()])
BAD_TAGS = st.sampled_from(["one-string", [""], [42], ["x" * 300]])


class CacheAgainstLocMem(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ours = make_cache(KEY_PREFIX=f"model-{uuid.uuid4().hex[:10]}")
        self.model = LocMemCache(f"model-{uuid.uuid4().hex}", {"TIMEOUT": 300})
        self.raw = RedisCluster(host="127.0.0.1", port=int(settings.CLUSTER_LOCATION[0].rsplit(":", 1)[1]))

    def teardown(self) -> None:
        self.ours.clear()
        self.raw.close()

    def both(self, call):
        """Call both caches; they must agree on the result, or both raise."""
        outcomes = []
        for cache in (self.ours, self.model):
            try:
                outcomes.append(("ok", call(cache)))
            except (ValueError, TypeError) as error:
                outcomes.append(("raised", type(error).__name__))
        ours, theirs = outcomes
        assert ours[0] == theirs[0], (ours, theirs)
        if ours[0] == "ok":
            assert _same(ours[1], theirs[1]), (ours, theirs)

    def snapshot(self) -> dict:
        """Every key of this cache on the cluster with its bytes (its TTL moves by itself)."""
        found = {}
        for node in self.raw.get_primaries():
            for key in node.redis_connection.scan_iter(match=f"*{self.ours.key_prefix}*", count=1000):
                is_string = node.redis_connection.type(key) == b"string"
                found[key] = node.redis_connection.get(key) if is_string else None
        return found

    def refused(self, call, errors=(TypeError, ValueError)) -> None:
        before = self.snapshot()
        with pytest.raises(errors):
            call(self.ours)
        assert self.snapshot() == before

    # -- good calls ---------------------------------------------------------------------------------
    @rule(key=KEYS, value=VALUES, timeout=TIMEOUTS)
    def set(self, key, value, timeout):
        self.both(lambda cache: cache.set(key, value, timeout))

    @rule(key=KEYS, value=VALUES, timeout=TIMEOUTS)
    def add(self, key, value, timeout):
        self.both(lambda cache: cache.add(key, value, timeout))

    @rule(key=KEYS)
    def get(self, key):
        self.both(lambda cache: cache.get(key, "<default>"))

    @rule(key=KEYS)
    def delete(self, key):
        self.both(lambda cache: cache.delete(key))

    @rule(key=KEYS, delta=st.integers(-(2**40), 2**40))
    def incr(self, key, delta):
        held = self.model.get(key, "<missing>")
        if held == "<missing>" or (type(held) is int and -(2**62) < held < 2**62):
            self.both(lambda cache: cache.incr(key, delta))
        else:  # Redis counts in 64-bit integers only; LocMemCache adds anything to anything
            self.refused(lambda cache: cache.incr(key, delta))

    @rule(keys=st.lists(KEYS, max_size=4))
    def get_many(self, keys):
        self.both(lambda cache: cache.get_many(keys))

    @rule(data=st.dictionaries(KEYS, VALUES, max_size=4), timeout=TIMEOUTS)
    def set_many(self, data, timeout):
        self.both(lambda cache: cache.set_many(data, timeout))

    @rule(keys=st.lists(KEYS, max_size=4))
    def delete_many(self, keys):
        self.both(lambda cache: cache.delete_many(keys))

    @rule(key=KEYS, timeout=TIMEOUTS)
    def touch(self, key, timeout):
        self.both(lambda cache: cache.touch(key, timeout))

    @rule(key=KEYS, value=VALUES)
    def get_or_set(self, key, value):
        self.both(lambda cache: cache.get_or_set(key, value))

    @rule(key=KEYS)
    def has_key(self, key):
        self.both(lambda cache: cache.has_key(key))

    # -- bad calls: refused, nothing written ------------------------------------------------------------
    @rule(key=BAD_KEYS, value=VALUES)
    def set_bad_key(self, key, value):
        self.refused(lambda cache: cache.set(key, value))
        self.refused(lambda cache: cache.set_many({"a": value, key: value}))
        self.refused(lambda cache: cache.get_many(["a", key]))

    @rule(key=KEYS, value=VALUES, timeout=BAD_TIMEOUTS)
    def set_bad_timeout(self, key, value, timeout):
        self.refused(lambda cache: cache.set(key, value, timeout, tags=["tag-for-bad-timeout"]))
        self.refused(lambda cache: cache.set_many({key: value, "other": 1}, timeout))
        self.refused(lambda cache: cache.touch(key, timeout))
        self.refused(lambda cache: cache.get_or_set(key, lambda: value, timeout))

    @rule(key=KEYS, value=BAD_VALUES)
    def set_unpicklable(self, key, value):
        self.refused(lambda cache: cache.set(key, value), Exception)
        self.refused(lambda cache: cache.set_many({"a": 1, key: value}), Exception)
        # With tags: refused before their versions are read, so no tag key is created or extended either.
        self.refused(lambda cache: cache.set(key, value, tags=["tag-for-bad-value"]), Exception)
        self.refused(lambda cache: cache.add(key, value, tags=["tag-for-bad-value"]), Exception)
        self.refused(
            lambda cache: cache.set_many({"a": 1, key: value}, tags=["tag-for-bad-value"]), Exception
        )

    @rule(key=KEYS, value=VALUES, tags=BAD_TAGS)
    def set_bad_tags(self, key, value, tags):
        self.refused(lambda cache: cache.set(key, value, tags=tags))
        self.refused(lambda cache: cache.set_many({key: value}, tags=tags))

    @rule(key=KEYS, delta=st.sampled_from([1.5, "1", True, 2**64]))
    def incr_bad_delta(self, key, delta):
        self.refused(lambda cache: cache.incr(key, delta), (TypeError, ValueError, OverflowError))

    @invariant()
    def every_key_agrees(self):
        keys = ["a", "b", "c", "ключ", "{slot}x", "with space", "other"]
        assert _same(self.ours.get_many(keys), self.model.get_many(keys))


def _same(ours, theirs) -> bool:
    if isinstance(ours, float) and isinstance(theirs, float) and math.isnan(ours) and math.isnan(theirs):
        return True
    return ours == theirs


CacheAgainstLocMem.TestCase.settings = hypothesis_settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheAgainstLocMem = CacheAgainstLocMem.TestCase
