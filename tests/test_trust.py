"""Values an attacker with write access to Redis plants: none of them is ever unpickled, through any read
path, and each is a miss counted `undecodable`. Signing keys rotate through SECRET_KEY_FALLBACKS."""

from __future__ import annotations

import pickle
import struct

import pytest
from django.core.cache import caches
from redis.cluster import RedisCluster

import django_distcache
from django_distcache import stampede
from django_distcache.codec import FLAG_SIGNED, FLAG_TAGS, FORMAT_VERSION, MAC_SIZE, raw_header
from tests.conftest import make_cache


class _Trap:
    """Unpickling it would run `_sprung` (as a planted `os.system` pickle would run a command)."""

    sprung = 0

    def __reduce__(self):
        return (_sprung, ())


def _sprung():
    _Trap.sprung += 1
    return "unpickled!"


TRAP = pickle.dumps(_Trap(), pickle.HIGHEST_PROTOCOL)


@pytest.fixture
def raw(cluster):
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


def _header(
    flags: int, serializer_id: int = 1, compressor_id: int = 0, version: int = FORMAT_VERSION
) -> bytes:
    return raw_header(flags, serializer_id, compressor_id, version)


def planted_values(genuine: bytes) -> dict[str, bytes]:
    """The forms a planted pickle can take; `genuine` is a value this cache signed for another key."""
    head = genuine[:2]  # MAGIC and the descriptor of a small signed pickle
    return {
        "wrong MAC": head + TRAP + genuine[-MAC_SIZE:],
        "zero MAC": head + TRAP + b"\0" * MAC_SIZE,
        "no MAC, flagged unsigned": _header(0) + TRAP,
        "corrupt tag section": _header(FLAG_SIGNED | FLAG_TAGS) + b"\x09\xff" + TRAP + b"\0" * MAC_SIZE,
        "unknown serializer id": _header(FLAG_SIGNED, serializer_id=77) + TRAP + b"\0" * MAC_SIZE,
        "unknown compressor id": _header(FLAG_SIGNED, compressor_id=99) + TRAP + b"\0" * MAC_SIZE,
        "another format version": _header(FLAG_SIGNED, version=4) + TRAP + b"\0" * MAC_SIZE,
        "format 2 (earlier releases)": b"\xdc\x5e"
        + bytes((2, FLAG_SIGNED, 1, 0))
        + struct.pack(">d", 0.0)
        + b"\0" * MAC_SIZE
        + TRAP,
        "copied from another key": genuine,
    }


def test_no_planted_value_is_unpickled_through_any_read_path(cache, raw):
    @django_distcache.cached(timeout=60, key="trust:memo")
    def memoized():
        return "computed"

    cache.set("source", "genuine")
    genuine = raw.get(cache.physical_key("source"))
    memo_cache = caches["default"]  # where @cached keeps its entries
    for name, planted in planted_values(genuine).items():
        before = cache.failure_counts.get("undecodable", 0)
        raw.set(cache.physical_key("victim"), planted)
        reads = {
            "get": cache.get("victim", "<miss>"),
            "get_many": cache.get_many(["victim"]).get("victim", "<miss>"),
            "has_key": cache.has_key("victim"),
            "get_or_set": cache.get_or_set("victim", "<set>", 60),
        }
        raw.set(cache.physical_key("victim"), planted)
        reads["get_or_set(callable)"] = cache.get_or_set("victim", lambda: "<computed>", 60)
        raw.set(cache.physical_key("victim"), planted)
        policy = stampede.policy_for(cache.core, stale=60, refresh="inline")
        reads["stale read"] = stampede.get_or_compute(
            cache.core, "victim", None, lambda: "<c>", 60, None, policy, "t"
        )
        raw.set(cache.physical_key("victim"), planted)
        reads["add"] = cache.add("victim", "<added>")
        raw.set(cache.physical_key("victim"), planted)
        with pytest.raises(ValueError):
            cache.incr_version("victim")  # a value that does not verify is as good as missing
        raw.set(memo_cache.physical_key("trust:memo"), planted)
        reads["@cached"] = memoized()
        memoized.invalidate()
        assert _Trap.sprung == 0, name
        assert reads == {
            "get": "<miss>",
            "get_many": "<miss>",
            "has_key": False,
            "get_or_set": "<set>",
            "get_or_set(callable)": "<computed>",
            "stale read": "<c>",
            "add": True,
            "@cached": "computed",
        }, name
        assert cache.failure_counts.get("undecodable", 0) > before, name
        cache.delete("victim")


def test_raw_pickles_written_by_another_client_come_back_as_bytes(cache, raw):
    raw.set(cache.physical_key("foreign"), TRAP)
    assert cache.get("foreign") == TRAP
    assert cache.get_many(["foreign"]) == {"foreign": TRAP}
    assert _Trap.sprung == 0


def test_signing_keys_rotate_through_secret_key_fallbacks(cache, settings):
    """After SECRET_KEY changes, values signed with the old one stay readable while it is listed in
    SECRET_KEY_FALLBACKS, and new values are signed with the new one; once dropped, old values miss."""
    settings.SECRET_KEY = "the-old-secret"
    old = make_cache(KEY_PREFIX=cache.key_prefix)
    old.set("signed-before", {"v": 1})
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "the-new-secret", ["the-old-secret"]
    rotated = make_cache(KEY_PREFIX=cache.key_prefix)
    assert rotated.get("signed-before") == {"v": 1}
    rotated.set("signed-after", {"v": 2})
    assert old.get("signed-after", "<miss>") == "<miss>"  # the old key alone cannot read new values
    settings.SECRET_KEY_FALLBACKS = []
    done = make_cache(KEY_PREFIX=cache.key_prefix)
    assert done.get("signed-before", "<miss>") == "<miss>"
    assert done.get("signed-after") == {"v": 2}
    assert _Trap.sprung == 0
