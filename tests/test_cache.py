"""The backend's own promises beyond Django's suite: extensions, cluster routing, bad input, clear()."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
from django.core.exceptions import ImproperlyConfigured
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError

from django_distcache.codec import ValueTooLargeError
from django_distcache.topology import cluster as cluster_module
from tests.conftest import Peer, make_cache


@pytest.fixture
def raw(cluster):
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


def test_round_trip_of_many_types(cache):
    values = {
        "str": "héllo",
        "int": 42,
        "neg": -7,
        "big": 2**70,
        "float": 1.5,
        "none": None,
        "list": [1, "a", None],
        "dict": {"a": (1, 2)},
        "bytes": b"\x00\xff",
        "bool": True,
    }
    for key, value in values.items():
        cache.set(key, value)
    assert {key: cache.get(key) for key in values} == values
    assert cache.get_many(list(values)) == values


def test_get_many_sends_one_batch_per_node_and_writes_all_before_reading(cache, monkeypatch):
    keys = [f"k{i}" for i in range(100)]
    cache.set_many({key: i for i, key in enumerate(keys)})
    slots = {key_slot(cache.physical_key(key)) for key in keys}
    assert len(slots) > 50  # the keys really are spread over many slots, so MGET would be CROSSSLOT
    events = []
    me = threading.current_thread()
    real = cluster_module._NodePool.get

    def spying_get(pool):
        connection = real(pool)
        if threading.current_thread() is not me or getattr(connection, "_spied", False):
            return connection  # other threads' calls are not this test's; a reused connection is spied once
        send = connection.send_packed_command
        connection.send_packed_command = lambda *a, **k: (events.append(("send", pool)), send(*a, **k))[1]
        connection._spied = True
        return connection

    monkeypatch.setattr(cluster_module._NodePool, "get", spying_get)
    real_read_replies = cluster_module._read_replies

    def spying_read_replies(connection, count):
        if threading.current_thread() is me:
            events.append(("read", count))
        return real_read_replies(connection, count)

    monkeypatch.setattr(cluster_module, "_read_replies", spying_read_replies)
    _wait_for_backplane(cache)  # so the namespace generation is held in-process, not re-read
    events.clear()
    assert cache.get_many(keys) == {key: i for i, key in enumerate(keys)}
    sends = [pool for kind, pool in events if kind == "send"]
    first_read = next(i for i, (kind, _) in enumerate(events) if kind == "read")
    assert len(sends) == 3 == len(set(sends))  # one write per primary
    assert all(kind == "send" for kind, _ in events[:first_read])  # every write before any read
    assert sum(count for kind, count in events if kind == "read") == 100


def _wait_for_backplane(cache, timeout=10.0):
    cache.get("warm-up")
    deadline = time.monotonic() + timeout
    while not cache.core.backplane.connected:
        assert time.monotonic() < deadline, "the invalidation channel did not come up"
        time.sleep(0.01)
    cache.get("warm-up")


def test_hash_tags_in_user_keys_are_respected(cache, raw):
    first, second = cache.physical_key("{user:42}:profile"), cache.physical_key("{user:42}:cart")
    assert key_slot(first) == key_slot(second) == raw.keyslot("user:42")
    cache.set_many({"{user:42}:profile": "p", "{user:42}:cart": "c"})
    assert cache.get_many(["{user:42}:profile", "{user:42}:cart"]) == {
        "{user:42}:profile": "p",
        "{user:42}:cart": "c",
    }


def test_foreign_value_is_returned_as_bytes_never_unpickled(cache, raw):
    raw.set(cache.physical_key("foreign"), b"written by another client")
    assert cache.get("foreign") == b"written by another client"
    # Bytes that look like a pickle are still just bytes.
    raw.set(cache.physical_key("pickled"), pickle.dumps({"a": 1}))
    assert cache.get("pickled") == pickle.dumps({"a": 1})


class _Boom:
    triggered = False

    def __reduce__(self):
        return (_trip, ())


def _trip():
    _Boom.triggered = True
    return "unpickled!"


def test_forged_envelope_is_a_miss_and_is_not_unpickled(cache, raw):
    cache.set("victim", "genuine")
    genuine = raw.get(cache.physical_key("victim"))
    forged = genuine[: -len(pickle.dumps("genuine", pickle.HIGHEST_PROTOCOL))] + pickle.dumps(_Boom())
    raw.set(cache.physical_key("victim"), forged)
    assert cache.get("victim", "default") == "default"
    assert _Boom.triggered is False


def test_value_signed_under_another_secret_key_is_a_miss(cache, raw, settings):
    cache.set("k", {"v": 1})
    other = make_cache(KEY_PREFIX=cache.key_prefix, OPTIONS={"SIGNING_KEY": "another secret"})
    assert other.get("k", "miss") == "miss"


def test_incr_is_atomic_keeps_ttl_and_raises_for_missing(cache):
    with pytest.raises(ValueError):
        cache.incr("missing")
    assert cache.get("missing") is None  # incr on a missing key creates nothing
    cache.set("counter", 0, timeout=100)

    def work():
        for _ in range(50):
            cache.incr("counter")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.get("counter") == 400
    assert 95 <= cache.ttl("counter") <= 100
    assert cache.decr("counter", 500) == -100
    cache.set("text", "abc")
    with pytest.raises(TypeError):
        cache.incr("text")


def test_ttl_expire_persist(cache):
    assert cache.ttl("nothing") == 0
    cache.set("k", "v", timeout=50)
    assert 49 <= cache.ttl("k") <= 50
    assert cache.expire("k", 500) is True
    assert 499 <= cache.ttl("k") <= 500
    assert cache.persist("k") is True
    assert cache.ttl("k") is None
    assert cache.persist("nothing") is False
    assert cache.expire("nothing", 10) is False


def test_get_many_or_set_computes_only_missing_keys(cache):
    cache.set_many({"a": 1, "b": 2})
    calls = []

    def factory(missing):
        calls.append(list(missing))
        return {key: key.upper() for key in missing}

    assert cache.get_many_or_set(["a", "b", "c", "d"], factory) == {"a": 1, "b": 2, "c": "C", "d": "D"}
    assert calls == [["c", "d"]]
    assert cache.get_many_or_set(["a", "c", "d"], factory) == {"a": 1, "c": "C", "d": "D"}
    assert calls == [["c", "d"]]  # nothing missing, factory not called


def test_get_many_or_set_rejects_a_factory_that_returns_no_mapping(cache):
    with pytest.raises(TypeError, match="mapping"):
        cache.get_many_or_set(["x"], lambda missing: ["not", "a", "dict"])
    assert cache.get("x") is None


def test_lock_excludes_other_holders(cache):
    lock = cache.lock("resource", timeout=5)
    assert lock.acquire(blocking=False)
    other = cache.lock("resource", timeout=5)
    assert not other.acquire(blocking=False)
    lock.release()
    assert other.acquire(blocking=False)
    other.release()


def test_non_string_key_raises_and_writes_nothing(cache):
    with pytest.raises(TypeError, match="must be str"):
        cache.set(42, "v")
    with pytest.raises(TypeError, match="must be str"):
        cache.get_many(["ok", 42])


def test_unpicklable_value_raises_and_leaves_the_cache_unchanged(cache):
    cache.set("k", "before")
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        cache.set("k", lambda: None)
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        cache.set_many({"a": 1, "k": threading.Lock()})
    assert cache.get("k") == "before"
    assert cache.get("a") is None  # set_many encodes everything before writing anything


def test_value_over_the_size_cap_raises_and_leaves_the_cache_unchanged():
    cache = make_cache(OPTIONS={"MAX_VALUE_SIZE": 1000})
    cache.set("k", "small")
    with pytest.raises(ValueTooLargeError, match="MAX_VALUE_SIZE"):
        cache.set("k", "x" * 2000)
    assert cache.get("k") == "small"


@pytest.mark.parametrize("serializer", ["pickle", "json", "msgpack"])
@pytest.mark.parametrize("compressor", ["none", "zlib", "zstd"])
def test_serializers_and_compressors(serializer, compressor):
    cache = make_cache(OPTIONS={"SERIALIZER": serializer, "COMPRESSOR": compressor, "COMPRESS_MIN_SIZE": 100})
    value = {"name": "x" * 5000, "items": [1, 2, 3], "nested": {"ok": True}}
    cache.set("k", value)
    assert cache.get("k") == value
    assert cache.get_many(["k"]) == {"k": value}


def test_compression_shrinks_large_values(raw):
    plain = make_cache()
    packed = make_cache(OPTIONS={"COMPRESSOR": "zlib"})
    value = "repetitive " * 1000
    plain.set("k", value)
    packed.set("k", value)
    assert len(raw.get(packed.physical_key("k"))) < len(raw.get(plain.physical_key("k"))) / 5
    assert packed.get("k") == value


def test_clear_drops_only_this_caches_keys_and_never_flushes(cluster, raw):
    mine, theirs = make_cache(), make_cache()
    mine.set_many({f"k{i}": i for i in range(200)})
    theirs.set("k1", "kept")
    raw.set("foreign:key", "kept")
    before = _command_calls(raw, ("flushall", "flushdb", "keys"))
    assert _keys_with_prefix(raw, mine.key_prefix) == 200
    assert mine.clear() is True
    assert mine.get_many([f"k{i}" for i in range(200)]) == {}
    assert theirs.get("k1") == "kept"
    assert raw.get("foreign:key") == b"kept"
    assert _command_calls(raw, ("flushall", "flushdb", "keys")) == before
    # The background purge reclaims the old generation's memory on every primary.
    assert mine.core.shared.purger.idle.wait(30)
    assert _keys_with_prefix(raw, mine.key_prefix) == 0
    assert _keys_with_prefix(raw, theirs.key_prefix) == 1
    raw.delete("foreign:key")


def test_clear_is_seen_by_another_process(cluster):
    writer = make_cache()
    writer.set("k", "v")
    with Peer(writer.key_prefix) as reader:
        assert reader.get("k") == "v"
        assert reader.get("k") == "v"  # now held in-process by the reader
        writer.clear()
        assert reader.wait_for_miss("k", within=1.0) <= 1.0  # VERSION_CHECK_INTERVAL, the documented bound


def test_deleted_namespace_key_makes_entries_miss(cache, raw):
    cache.set("k", "v")
    raw.delete(cache.core.namespace.key)
    cache.core.namespace.checked_at = 0  # as if the check interval had passed
    assert cache.get("k") is None


def test_response_errors_are_never_swallowed(cache, raw):
    raw.hset(cache.physical_key("h"), "field", "value")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        cache.get("h")


def test_bad_location_fails_at_construction():
    with pytest.raises(ImproperlyConfigured, match="redis://"):
        make_cache(LOCATION=["http://127.0.0.1:7000"])
    with pytest.raises(ImproperlyConfigured, match="SERIALIZER|serializer"):
        make_cache(OPTIONS={"SERIALIZER": "yaml"})
    with pytest.raises(ImproperlyConfigured, match="unknown OPTIONS"):
        make_cache(OPTIONS={"SOCKET_TIMEOUTS": 1})


def _command_calls(raw, names):
    total = 0
    for stats in raw.info("commandstats", target_nodes=RedisCluster.ALL_NODES).values():
        for name in names:
            total += stats.get(f"cmdstat_{name}", {}).get("calls", 0)
    return total


def _keys_with_prefix(raw, prefix):
    """Entries of a KEY_PREFIX (its keys but those of the backend's own, `<prefix>:~...`)."""
    return sum(1 for _ in raw.scan_iter(match=f"{prefix}:[^~]*", target_nodes=RedisCluster.PRIMARIES))


def test_clear_never_frees_a_held_lock(cache):
    held = cache.lock("job", timeout=30)
    assert held.acquire(blocking=False)
    cache.clear()
    assert not cache.lock("job", timeout=30).acquire(blocking=False)
    held.release()


def test_planted_unsigned_value_is_a_miss(cache, raw):
    from django_distcache.codec import Codec, JSONSerializer, NoCompressor

    unsigned = Codec(JSONSerializer(), NoCompressor(), [b"x" * 32])
    raw.set(cache.physical_key("role"), unsigned.encode({"is_admin": True}, b""))
    assert cache.get("role", "miss") == "miss"


def test_corrupt_value_is_a_miss_not_an_error(raw):
    cache = make_cache(OPTIONS={"SERIALIZER": "json", "COMPRESSOR": "zlib", "COMPRESS_MIN_SIZE": 10})
    cache.set("k", "x" * 100)
    stored = raw.get(cache.physical_key("k"))
    raw.set(cache.physical_key("k"), stored[:-5] + b"XXXXX")
    assert cache.get("k", "miss") == "miss"
    assert cache.failure_counts["undecodable"] >= 1


def test_incr_rejects_a_delta_out_of_range_with_a_clear_error(cache):
    cache.set("n", 1)
    with pytest.raises(OverflowError, match="delta"):
        cache.incr("n", 2**64)
    with pytest.raises(TypeError, match="delta"):
        cache.incr("n", 1.5)
    assert cache.get("n") == 1


def _keys_of(cache, raw) -> list[bytes]:
    """Every key this test's cache holds on the cluster: its entries and its tag keys."""
    found = []
    for node in raw.get_primaries():
        found += node.redis_connection.keys(f"*{cache.key_prefix}*")
    return found


@pytest.mark.parametrize(
    ("timeout", "error", "message"),
    [
        (float("nan"), ValueError, "nan"),
        ("60", TypeError, "number of seconds"),
        ([60], TypeError, "number of seconds"),
        (True, TypeError, "number of seconds"),
    ],
)
def test_a_bad_timeout_is_refused_clearly_before_anything_is_written(cache, raw, timeout, error, message):
    cache.set("k", "before")
    before = sorted(_keys_of(cache, raw))
    for call in (
        lambda: cache.set("k", "after", timeout, tags=["fresh-tag"]),
        lambda: cache.add("new", "v", timeout, tags=["fresh-tag"]),
        lambda: cache.set_many({"k": "after", "new": "v"}, timeout, tags=["fresh-tag"]),
        lambda: cache.touch("k", timeout),
        lambda: cache.get_or_set("new", "v", timeout, tags=["fresh-tag"]),
        lambda: cache.get_or_set("new", lambda: "v", timeout, tags=["fresh-tag"]),
        lambda: cache.get_many_or_set(["new"], lambda keys: dict.fromkeys(keys, 1), timeout, tags=["t"]),
    ):
        with pytest.raises(error, match=message):
            call()
    assert cache.get("k") == "before" and cache.ttl("k") > 200
    assert sorted(_keys_of(cache, raw)) == before  # no entry, no tag key


def test_a_value_that_cannot_be_stored_creates_no_tag_key(cache, raw):
    """A tagged write reads (and creates) its tags' versions before it writes the entry: the value is
    serialized first, so a value refused leaves no tag key behind."""
    from django_distcache.codec import ValueTooLargeError

    small = make_cache(KEY_PREFIX=cache.key_prefix, OPTIONS={"MAX_VALUE_SIZE": 1000})
    for call, error in (
        (lambda: cache.set("k", lambda: None, tags=["fresh"]), Exception),
        (lambda: cache.set_many({"a": 1, "k": threading.Lock()}, tags=["fresh"]), TypeError),
        (lambda: small.set("k", "x" * 5000, tags=["fresh"]), ValueTooLargeError),
    ):
        with pytest.raises(error):
            call()
    assert _keys_of(cache, raw) == []
    assert cache.get("a") is None


def test_huge_and_infinite_timeouts_mean_never_expire(cache):
    """As Django's own backends treat them; Redis itself refuses an expiry past its 64-bit clock."""
    for timeout in (float("inf"), 10**20, 1e300):
        cache.set("forever", "value", timeout)
        assert cache.get("forever") == "value" and cache.ttl("forever") is None
        cache.set("forever", "short", 60)
        assert cache.touch("forever", timeout) and cache.ttl("forever") is None
    cache.set("gone", 1, float("-inf"))
    assert cache.get("gone") is None
    assert cache.get_or_set("stale-forever", lambda: 5, timeout=float("inf"), stale=60) == 5


def test_a_key_without_a_utf8_form_is_refused_clearly(cache):
    from django.core.cache.backends.base import InvalidCacheKey

    for call in (
        lambda: cache.set("bad\ud800key", 1),
        lambda: cache.get("bad\ud800key"),
        lambda: cache.get_many(["fine", "bad\udfffkey"]),
        lambda: cache.set_many({"fine": 1, "bad\ud800": 2}),
    ):
        with pytest.raises(InvalidCacheKey, match="UTF-8"):
            call()
    assert cache.get("fine") is None  # set_many made every key before writing any
    cache.set("naïve-ключ-鍵", 1)  # any other text is a key
    assert cache.get("naïve-ключ-鍵") == 1


def test_no_round_trip_carries_more_than_one_slice_of_a_huge_batch(cache, monkeypatch):
    """A batch of any size is sent in slices, so no write to a socket is larger than its timeout can cover
    (a single pipelined write of 500,000 GETs timed out and every key degraded to a miss)."""
    from django_distcache.topology import base

    monkeypatch.setattr(base, "BATCH_SLICE", 50)
    monkeypatch.setattr(cluster_module, "BATCH_SLICE", 50)
    sizes = []
    real = cluster_module.ClusterTopology.round_steps

    def spying(self, calls, positions, results, *rest):
        sizes.append(len(calls))
        return real(self, calls, positions, results, *rest)

    monkeypatch.setattr(cluster_module.ClusterTopology, "round_steps", spying)
    keys = [f"k{i}" for i in range(1234)]
    cache.set_many({key: i for i, key in enumerate(keys[::2])})
    assert cache.get_many(keys) == {key: i for i, key in enumerate(keys[::2])}
    cache.delete_many(keys)
    assert sizes and max(sizes) <= 50


def test_a_hundred_thousand_keys_in_one_get_many_all_come_back(cache):
    keys = [f"many:{i}" for i in range(100_000)]
    stored = {key: i for i, key in enumerate(keys[::5])}
    cache.set_many(stored)
    assert cache.get_many(keys) == stored
    assert not cache.failure_counts.get("get_many")
    cache.delete_many(keys)
    assert cache.get_many(keys[:1000]) == {}


async def test_a_large_aget_many_all_comes_back(cache):
    keys = [f"amany:{i}" for i in range(60_000)]
    stored = {key: i for i, key in enumerate(keys[::3])}
    await cache.aset_many(stored)
    assert await cache.aget_many(keys) == stored
    await cache.adelete_many(keys)


def test_a_signed_value_copied_to_another_key_is_a_miss(cache, raw):
    cache.set("user:1:is_staff", True)
    cache.set("user:2:is_staff", False)
    raw.set(cache.physical_key("user:2:is_staff"), raw.get(cache.physical_key("user:1:is_staff")))
    before = cache.failure_counts.get("undecodable", 0)
    assert cache.get("user:2:is_staff", "miss") == "miss"
    assert cache.failure_counts["undecodable"] == before + 1
    # Nor to another version of the same key, nor to the same key of another KEY_PREFIX (same secret).
    raw.set(cache.physical_key("user:1:is_staff", version=2), raw.get(cache.physical_key("user:1:is_staff")))
    assert cache.get("user:1:is_staff", "miss", version=2) == "miss"
    other = make_cache()
    raw.set(other.physical_key("user:1:is_staff"), raw.get(cache.physical_key("user:1:is_staff")))
    assert other.get("user:1:is_staff", "miss") == "miss"
    assert cache.get("user:1:is_staff") is True


def test_a_bare_integer_can_be_copied_between_keys_as_documented(cache, raw):
    cache.set("credits:1", 100)
    raw.set(cache.physical_key("credits:2"), raw.get(cache.physical_key("credits:1")))
    assert cache.get("credits:2") == 100  # unsigned, so that INCRBY works on it (docs/security.md)


def test_incr_version_re_signs_the_value_for_its_new_version(cache, raw):
    cache.set("profile", {"plan": "pro"}, tags=["account:1"])
    assert cache.incr_version("profile") == 2
    assert cache.get("profile", version=2) == {"plan": "pro"}
    assert cache.get("profile", "gone") == "gone"
    cache.invalidate_tags("account:1")  # the tag stamps moved with it
    assert cache.get("profile", "stale", version=2) == "stale"


def test_incr_version_of_a_value_that_does_not_verify_raises_like_a_missing_key(cache, raw):
    cache.set("a", ["signed for a"])
    raw.set(cache.physical_key("b"), raw.get(cache.physical_key("a")))
    with pytest.raises(ValueError, match="not found"):
        cache.incr_version("b")
    assert raw.get(cache.physical_key("b", version=2)) is None


@pytest.mark.parametrize("compressor", ["none", "zlib"])
def test_a_planted_decompression_bomb_is_a_miss_and_memory_stays_bounded(cache, raw, compressor):
    """1 GiB of JSON squeezed into ~1 MB of zlib, planted in a JSON cache (unsigned by design; the envelope,
    not COMPRESSOR, picks the decompressor): a reader in another process misses, counts it undecodable and
    grows by about MAX_VALUE_SIZE (16 MiB by default), not by the gigabyte."""
    import zlib

    from django_distcache.codec import JSONSerializer, raw_header

    stream, block = zlib.compressobj(9), b" " * (1 << 20)
    bomb = b"".join(stream.compress(block) for _ in range(1024)) + stream.flush()
    header = raw_header(0, JSONSerializer.id, 1)
    options = {"SERIALIZER": "json", "COMPRESSOR": compressor}
    reader = make_cache(KEY_PREFIX=cache.key_prefix, OPTIONS=options)
    raw.set(reader.physical_key("bomb"), header + bomb)
    with Peer(cache.key_prefix, options) as peer:
        assert peer.get("warm-up") is None
        before = peer.ask("rss")
        assert peer.get("bomb") is None
        grown_mib = (peer.ask("rss") - before) / 1024
    assert grown_mib < 100, f"the reader grew by {grown_mib:.0f} MiB"
    before = reader.failure_counts.get("undecodable", 0)
    assert reader.get("bomb", "miss") == "miss"
    assert reader.failure_counts["undecodable"] == before + 1
