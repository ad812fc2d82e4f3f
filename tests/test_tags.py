"""Tags against the real cluster: O(1) invalidation, eviction-safe, race-safe, pushed to other processes."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis
from redis.cluster import RedisCluster

import django_distcache
from django_distcache.cache import CacheUnavailable
from django_distcache.tags import MAX_TAGS_PER_VALUE, TAG_TTL_MARGIN
from django_distcache.topology import ClusterTopology
from tests.conftest import Peer, make_cache, tag_keys, wait_for_backplane


@pytest.fixture
def raw(cluster):
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


def test_invalidating_a_tag_misses_every_entry_carrying_it_and_nothing_else(cache):
    cache.set("p42", "product 42", tags=["product:42", "catalog"])
    cache.set("p43", "product 43", tags=["product:43", "catalog"])
    cache.set("home", "home page", tags=["home"])
    cache.set("plain", "untagged")
    assert cache.invalidate_tags("product:42") == 1
    assert cache.get("p42") is None
    assert cache.get_many(["p42", "p43", "home", "plain"]) == {
        "p43": "product 43",
        "home": "home page",
        "plain": "untagged",
    }
    cache.invalidate_tags("catalog")
    assert cache.get_many(["p42", "p43", "home", "plain"]) == {"home": "home page", "plain": "untagged"}
    assert cache.has_key("p43") is False
    cache.set("p43", "product 43 again", tags=["catalog"])  # a fresh write carries the new version
    assert cache.get("p43") == "product 43 again"


def test_tags_on_every_write_path(cache):
    assert cache.add("a", 1, tags=["t"]) is True
    cache.set_many({"b": 2, "c": 3}, tags=["t"])
    assert cache.get_or_set("d", lambda: 4, tags=["t"]) == 4
    assert cache.get_many_or_set(["e", "f"], lambda missing: {k: k for k in missing}, tags=["t"]) == {
        "e": "e",
        "f": "f",
    }
    assert cache.get_many(list("abcdef")) == {"a": 1, "b": 2, "c": 3, "d": 4, "e": "e", "f": "f"}
    cache.invalidate_tags("t")
    assert cache.get_many(list("abcdef")) == {}


async def test_tags_on_every_async_path(cache):
    assert await cache.aadd("a", 1, tags=["t"]) is True
    await cache.aset("b", 2, tags=["t"])
    await cache.aset_many({"c": 3}, tags=["t"])
    assert await cache.aget_or_set("d", lambda: 4, tags=["t"]) == 4

    async def factory(missing):
        return {key: key for key in missing}

    assert await cache.aget_many_or_set(["e"], factory, tags=["t"]) == {"e": "e"}
    assert await cache.aget_many(list("abcde")) == {"a": 1, "b": 2, "c": 3, "d": 4, "e": "e"}
    assert await cache.ainvalidate_tags("t") == 1
    assert await cache.aget_many(list("abcde")) == {}


def test_module_level_invalidate_tags(settings):
    from django.core.cache import caches

    default = caches["default"]
    default.set("k", "v", tags=["module-level"])
    assert django_distcache.invalidate_tags("module-level") == 1
    assert default.get("k") is None


def test_a_missing_tag_key_makes_its_entries_miss(cache, raw):
    cache.set("k", "v", tags=["fragile", "other"])
    assert cache.get("k") == "v"
    raw.delete(cache.core.tags.tag_key("fragile"))  # evicted, deleted by hand, lost in a failover
    cache.core.tags._local.clear()  # as another process that has not held it would see it
    assert cache.get("k") is None
    assert cache.get_many(["k"]) == {}


def test_tag_versions_are_random_64_bit_values(cache, raw):
    cache.set("k", "v", tags=["t"])
    seen = set()
    for _ in range(5):
        cache.invalidate_tags("t")
        seen.add(int(raw.get(cache.core.tags.tag_key("t"))))
    assert len(seen) == 5
    assert max(seen) > 2**40  # not a small counter


def test_invalidation_touches_only_the_tags_own_key(cache, monkeypatch):
    cache.set_many({f"k{i}": i for i in range(500)}, tags=["wide"])
    touched = []
    real = ClusterTopology.execute_batch

    def spy(self, calls):
        touched.extend(call.key for call in calls)
        return real(self, calls)

    monkeypatch.setattr(ClusterTopology, "execute_batch", spy)
    cache.invalidate_tags("wide")
    assert touched == [
        cache.core.tags.tag_key("wide"),
        cache.core.backplane.channel,
    ]  # one SET, one publish: O(1)


def test_get_or_set_is_race_safe_against_an_invalidation_during_the_computation(cache):
    """The value is computed from data that an invalidation declares stale: the entry must be born stale."""
    computing, invalidated = threading.Event(), threading.Event()

    def slow_loader():
        computing.set()
        assert invalidated.wait(10)
        return "computed from old data"

    def invalidator():
        assert computing.wait(10)
        cache.invalidate_tags("race")
        invalidated.set()

    thread = threading.Thread(target=invalidator)
    thread.start()
    assert cache.get_or_set("k", slow_loader, tags=["race"]) == "computed from old data"
    thread.join()
    assert cache.get("k") is None  # stored, but stamped with the version read before the computation


def test_another_process_stops_returning_an_invalidated_entry_within_the_bound(cache):
    cache.set("k", "v", tags=["shared"])
    with Peer(cache.key_prefix) as other:
        other.wait_connected()
        assert other.get("k") == "v"
        assert other.get("k") == "v"
        assert other.ask("stats")["held_tags"] >= 1  # the other process holds the version in-process
        cache.invalidate_tags("shared")
        elapsed = other.wait_for_miss("k", within=1.0)
    assert elapsed <= 1.0  # VERSION_CHECK_INTERVAL, the documented bound; the push makes it ~milliseconds


def test_a_dropped_invalidation_channel_drops_the_versions_held_in_process(cache, raw, cluster):
    cache.set("k", "v", tags=["t"])
    wait_for_backplane(cache)
    cache.get("k")
    cache.get("k")
    assert cache.core.tags.held_count() >= 1
    backplane = cache.core.backplane
    drops_before = backplane.drops
    # The server kills every pub/sub connection; then the tag changes without any message being sent.
    for port in cluster.ports:
        redis.Redis(port=port).execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    deadline = time.monotonic() + 2
    while backplane.drops == drops_before:  # the subscriber notices at once (EOF), not after a timeout
        assert time.monotonic() < deadline, "the dropped channel went unnoticed"
        time.sleep(0.005)
    raw.set(cache.core.tags.tag_key("t"), 12345)
    # Not one read may use the version held from before the drop.
    assert cache.core.tags.held_count() == 0
    assert cache.get("k") is None


def test_without_in_process_versions_every_read_asks_redis(raw):
    strict = make_cache(OPTIONS={"VERSION_CHECK_INTERVAL": 0})
    strict.set("k", "v", tags=["t"])
    assert strict.get("k") == "v"
    raw.set(strict.core.tags.tag_key("t"), 1)  # changed behind our back, no message
    assert strict.get("k") is None


def test_bad_tags_are_refused_and_nothing_is_written(cache):
    with pytest.raises(TypeError, match="list of strings"):
        cache.set("k", "v", tags="product:1")
    with pytest.raises(TypeError, match="non-empty str"):
        cache.set("k", "v", tags=["ok", 3])
    assert cache.get("k") is None


def test_invalidate_tags_never_silently_drops_an_invalidation():
    down = make_cache(LOCATION="redis://127.0.0.1:1")
    with pytest.raises(CacheUnavailable):
        down.invalidate_tags("t")


def test_incr_version_keeps_the_tags(cache):
    cache.set("k", "v", tags=["t"])
    cache.incr_version("k")
    assert cache.get("k", version=2) == "v"
    cache.invalidate_tags("t")
    assert cache.get("k", version=2) is None


def test_a_forked_child_trusts_nothing_until_it_has_its_own_subscription(cache):
    import os

    cache.set("k", "v", tags=["t"])
    wait_for_backplane(cache)
    cache.get("k")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it trusts right after the fork, and that it resubscribes
        try:
            held_after_fork = cache.core.tags.held_count()
            value = cache.get("k")
            deadline = time.monotonic() + 5
            while not cache.core.backplane.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            os.write(write, f"{held_after_fork}|{value}|{cache.core.backplane.connected}".encode())
        finally:
            os._exit(0)
    os.close(write)
    import select

    ready, _, _ = select.select([read], [], [], 20)
    if not ready:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    report = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert report == "0|v|True"


def test_a_dead_entry_does_not_block_add_or_get_or_set(cache):
    assert cache.get_or_set("k", lambda: "v1", tags=["tt"]) == "v1"
    cache.invalidate_tags("tt")
    assert cache.get_or_set("k", lambda: "v2", tags=["tt"]) == "v2"
    assert cache.get("k") == "v2"  # stored, not only returned
    cache.invalidate_tags("tt")
    assert cache.add("k", "v3", tags=["tt"]) is True
    assert cache.get("k") == "v3"
    assert cache.add("k", "v4", tags=["tt"]) is False  # a live entry still wins
    assert cache.get("k") == "v3"


# -- tag key lifetimes: bounded by the entries that carry them -------------------------------------------
MARGIN_MS = int(TAG_TTL_MARGIN * 1000)


def _tag_ttl_ms(raw, cache, tag) -> int:
    return raw.pttl(cache.core.tags.tag_key(tag))


def test_invalidating_tags_never_written_creates_no_key(cache, cluster):
    tags = [f"never-written:{n}" for n in range(1000)]
    assert cache.invalidate_tags(*tags) == 1000
    assert tag_keys(cluster, cache) == set()
    assert cache.get("anything") is None


def test_a_tagged_write_gives_its_tag_key_a_ttl_that_covers_the_entry(cache, raw):
    cache.set("k", "v", timeout=100, tags=["t"])
    assert 100_000 - 5_000 <= _tag_ttl_ms(raw, cache, "t") <= 100_000 + MARGIN_MS
    assert 95 <= cache.ttl("k") <= 100


@pytest.mark.parametrize("held", [True, False], ids=["held-in-process", "asked-every-time"])
def test_a_longer_write_extends_the_tag_key_and_a_shorter_one_never_shortens_it(raw, held):
    cache = make_cache(OPTIONS={"VERSION_CHECK_INTERVAL": 30.0 if held else 0})
    cache.set("short", "v", timeout=100, tags=["t"])
    if held:
        wait_for_backplane(cache)
        cache.set("short", "v", timeout=100, tags=["t"])  # held from a write made while the channel is up
        assert cache.core.tags.held_count() == 1
    cache.set("long", "v", timeout=5000, tags=["t"])  # a held version still extends the key
    assert 5_000_000 - 5_000 <= _tag_ttl_ms(raw, cache, "t") <= 5_000_000 + MARGIN_MS
    cache.set("shorter", "v", timeout=10, tags=["t"])
    assert _tag_ttl_ms(raw, cache, "t") >= 5_000_000 - 5_000
    assert cache.get_many(["short", "long", "shorter"]) == {"short": "v", "long": "v", "shorter": "v"}


def test_a_held_version_whose_key_lives_long_enough_costs_no_command(raw, monkeypatch):
    cache = make_cache(OPTIONS={"VERSION_CHECK_INTERVAL": 30.0})
    wait_for_backplane(cache)
    cache.set("a", 1, timeout=100, tags=["t"])
    tag_key = cache.core.tags.tag_key("t")
    sent = []
    for method in ("execute", "execute_batch"):
        real = getattr(ClusterTopology, method)

        def spy(self, request, real=real):
            sent.extend(call.key for call in ([request] if hasattr(request, "key") else request))
            return real(self, request)

        monkeypatch.setattr(ClusterTopology, method, spy)
    cache.set("b", 2, timeout=100, tags=["t"])
    cache.set("c", 3, timeout=50, tags=["t"])
    assert tag_key not in sent  # one SET per write: the tag key is known to outlive both entries
    cache.set("d", 4, timeout=10_000, tags=["t"])
    assert tag_key in sent  # a longer-lived entry: the key is extended first
    assert _tag_ttl_ms(raw, cache, "t") >= 10_000_000 - 5_000


def test_an_entry_stored_forever_keeps_its_tag_key_forever(cache, raw):
    cache.set("a", "v", timeout=10, tags=["t"])
    assert _tag_ttl_ms(raw, cache, "t") > 0
    cache.set("forever", "v", timeout=None, tags=["t"])
    assert _tag_ttl_ms(raw, cache, "t") == -1
    cache.set("b", "v", timeout=10, tags=["t"])
    assert _tag_ttl_ms(raw, cache, "t") == -1  # never given a TTL back while a forever entry may carry it
    cache.set("new", "v", timeout=None, tags=["fresh"])  # created without a TTL
    assert _tag_ttl_ms(raw, cache, "fresh") == -1


def test_the_tag_key_covers_the_stale_window_too(cache, raw):
    assert cache.get_or_set("k", lambda: "v", timeout=10, tags=["t"], stale=1000) == "v"
    assert 1_010_000 - 5_000 <= _tag_ttl_ms(raw, cache, "t") <= 1_010_000 + MARGIN_MS


def test_get_or_set_and_get_many_or_set_give_the_tag_key_its_ttl_before_computing(cache, raw):
    seen = {}

    def compute():
        seen["during"] = _tag_ttl_ms(raw, cache, "t")
        return "v"

    assert cache.get_or_set("k", compute, timeout=200, tags=["t"]) == "v"
    assert seen["during"] >= 200_000 - 5_000  # read and extended before the value was computed
    cache.get_many_or_set(["m"], lambda missing: dict.fromkeys(missing, 1), timeout=3000, tags=["u"])
    assert 3_000_000 - 5_000 <= _tag_ttl_ms(raw, cache, "u") <= 3_000_000 + MARGIN_MS


def test_invalidation_keeps_the_tag_key_ttl_and_still_makes_its_entries_miss(cache, raw):
    cache.set("k", "v", timeout=100, tags=["t"])
    before = raw.get(cache.core.tags.tag_key("t"))
    assert cache.invalidate_tags("t") == 1
    assert raw.get(cache.core.tags.tag_key("t")) != before  # a new version
    assert 100_000 - 5_000 <= _tag_ttl_ms(raw, cache, "t") <= 100_000 + MARGIN_MS  # the same lifetime
    assert cache.get("k") is None
    cache.set("k", "again", timeout=100, tags=["t"])
    assert cache.get("k") == "again"


def test_a_tag_key_that_expired_makes_its_entries_miss(cache, raw):
    strict = make_cache(KEY_PREFIX=cache.key_prefix, OPTIONS={"VERSION_CHECK_INTERVAL": 0})
    strict.set("k", "v", timeout=300, tags=["t", "other"])
    raw.pexpire(strict.core.tags.tag_key("t"), 1)  # expired (or evicted) before the entry
    deadline = time.monotonic() + 10
    while raw.exists(strict.core.tags.tag_key("t")):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert strict.get("k") is None
    assert strict.get_many(["k"]) == {}
    assert strict.get_or_set("k", lambda: "rebuilt", timeout=300, tags=["t"]) == "rebuilt"
    assert strict.get("k") == "rebuilt"  # the next write re-created the tag key, with a new version


def test_invalidating_an_evicted_tag_drops_the_version_other_processes_hold(cache, raw):
    cache.set("k", "v", tags=["shared"])
    with Peer(cache.key_prefix) as other:
        other.wait_connected()
        assert other.get("k") == "v"
        assert other.ask("stats")["held_tags"] >= 1
        raw.delete(cache.core.tags.tag_key("shared"))  # evicted: the other process still holds its version
        cache.invalidate_tags("shared")
        other.wait_for_miss("k", within=1.0)
    assert not raw.exists(cache.core.tags.tag_key("shared"))  # and the invalidation did not re-create it


@pytest.mark.django_db(transaction=True)
def test_cached_model_rows_give_their_tag_keys_a_ttl_that_covers_the_entries(raw, settings):
    from decimal import Decimal

    from django.core.cache import caches

    from tests.model_app.models import Product

    settings.CACHES = {
        "default": {
            "BACKEND": "django_distcache.cache.RedisClusterCache",
            "LOCATION": settings.CLUSTER_LOCATION,
            "KEY_PREFIX": f"t-{uuid.uuid4().hex[:12]}",
        }
    }
    cache = caches["default"]
    product = Product.objects.create(name="Teapot", slug="teapot", price=Decimal("9.50"))
    cache.clear()  # the write-through filled it: read it through from a cold cache
    assert django_distcache.get_cached(Product, pk=product.pk).name == "Teapot"
    for tag in ("model_app.product", f"model_app.product:{product.pk}", "catalogue"):
        assert 600_000 - 5_000 <= _tag_ttl_ms(raw, cache, tag) <= 600_000 + MARGIN_MS  # timeout=600


# -- the number of tags on one value ---------------------------------------------------------------------
TOO_MANY = [f"tag{n}" for n in range(70_000)]


def test_too_many_tags_are_refused_before_anything_is_written(cache, cluster):
    refused = [
        lambda: cache.set("k", "v", tags=TOO_MANY),
        lambda: cache.add("k", "v", tags=TOO_MANY),
        lambda: cache.set_many({"k": "v", "j": "w"}, tags=TOO_MANY),
        lambda: cache.get_or_set("k", lambda: "v", tags=TOO_MANY),
        lambda: cache.get_or_set("k", "v", tags=TOO_MANY),
        lambda: cache.get_many_or_set(["k"], lambda missing: dict.fromkeys(missing, "v"), tags=TOO_MANY),
        lambda: cache.set("k", "v", tags=[f"t{n}" for n in range(MAX_TAGS_PER_VALUE + 1)]),
    ]
    for call in refused:
        with pytest.raises(ValueError, match=f"more than {MAX_TAGS_PER_VALUE} tags.*MAX_TAGS_PER_VALUE"):
            call()
    assert tag_keys(cluster, cache) == set()
    assert cache.get_many(["k", "j"]) == {}
    cache.set("k", "v", tags=[f"t{n}" for n in range(MAX_TAGS_PER_VALUE)])  # the limit itself is fine
    assert cache.get("k") == "v"


async def test_too_many_tags_are_refused_on_the_async_paths_too(cache, cluster):
    with pytest.raises(ValueError, match="MAX_TAGS_PER_VALUE"):
        await cache.aset("k", "v", tags=TOO_MANY)
    with pytest.raises(ValueError, match="MAX_TAGS_PER_VALUE"):
        await cache.aget_or_set("k", lambda: "v", tags=TOO_MANY)
    assert tag_keys(cluster, cache) == set()


def test_too_many_tags_on_cached_functions_views_and_models_are_refused(cache, cluster, settings):
    from django.http import HttpResponse
    from django.test import RequestFactory

    from django_distcache import cache_model, cached, cached_view
    from django_distcache.models.registry import ModelCacheConfig
    from tests.model_app.models import Product, Uncached

    settings.CACHES = {
        "default": {
            "BACKEND": "django_distcache.cache.RedisClusterCache",
            "LOCATION": settings.CLUSTER_LOCATION,
            "KEY_PREFIX": cache.key_prefix,
        }
    }
    with pytest.raises(ValueError, match="MAX_TAGS_PER_VALUE"):
        cached(timeout=60, tags=TOO_MANY)
    greet = cached(timeout=60, tags=lambda name: TOO_MANY)(lambda name: f"hello {name}")
    with pytest.raises(ValueError, match="MAX_TAGS_PER_VALUE"):
        greet("alice")
    with pytest.raises(ValueError, match="MAX_TAGS_PER_VALUE"):
        cached_view(timeout=60, tags=TOO_MANY)
    page = cached_view(timeout=60, tags=lambda request: TOO_MANY)(lambda request: HttpResponse("page"))
    with pytest.raises(ValueError, match="MAX_TAGS_PER_VALUE"):
        page(RequestFactory().get("/page/"))
    with pytest.raises(ValueError, match="MAX_TAGS_PER_VALUE"):
        cache_model(Uncached, tags=TOO_MANY)
    per_row = ModelCacheConfig(
        model=Product,
        lookups=("pk",),
        timeout=60,
        write="through",
        tags=lambda row: TOO_MANY,
        cache_alias="default",
        negative_timeout=5,
    )
    with pytest.raises(ValueError, match="MAX_TAGS_PER_VALUE"):
        per_row.row_tags(Product(pk=1))  # a tags callable's answer is checked like a list given upfront
    assert tag_keys(cluster, cache) == set()


def test_every_prefix_of_a_process_is_listened_to_over_one_subscription(raw):
    """Each KEY_PREFIX has its own channel, and one connection and one thread carry them all: a process
    with many prefixes (a test run makes hundreds) does not pay a subscriber thread for each."""
    threads_before = sum(1 for t in threading.enumerate() if t.name == "distcache-backplane")
    caches = [make_cache(OPTIONS={"VERSION_CHECK_INTERVAL": 30.0}) for _ in range(12)]
    for cache in caches:
        cache.set("k", "v", tags=["t"])
        assert cache.get("k") == "v"  # the tag's version is now held in-process for 30 s
    for cache in caches:
        wait_for_backplane(cache)
    assert len({cache.core.backplane.subscriber for cache in caches}) == 1
    threads_after = sum(1 for t in threading.enumerate() if t.name == "distcache-backplane")
    assert threads_after - threads_before <= 1
    for cache in caches[::3]:  # another process invalidates: a new version, pushed on the prefix's channel
        raw.set(cache.core.tags.tag_key("t"), 12345)
        message = json.dumps(["tag", cache.key_prefix, "t", 12345])
        raw.execute_command(
            "SPUBLISH",
            cache.core.backplane.channel,
            message,
            target_nodes=raw.get_node_from_key(cache.core.backplane.channel),
        )
    for cache in caches:
        deadline = time.monotonic() + 10
        expected = None if cache in caches[::3] else "v"
        while cache.get("k") != expected:
            assert time.monotonic() < deadline, f"{cache.key_prefix} still reads {cache.get('k')!r}"
            time.sleep(0.01)


def test_a_malformed_message_on_the_channel_is_ignored_not_a_dropped_subscription(cache, raw):
    """Anyone allowed to publish on a prefix's channel can send anything; the one subscription every
    prefix of the process shares must not drop (and stop trusting everything held) for it."""
    cache.set("k", "v", tags=["t"])
    wait_for_backplane(cache)
    backplane = cache.core.backplane
    drops, messages = backplane.drops, backplane.messages
    for junk in (b"not json", b"[1, 2]", b"{}", b"null"):
        raw.execute_command(
            "SPUBLISH", backplane.channel, junk, target_nodes=raw.get_node_from_key(backplane.channel)
        )
    deadline = time.monotonic() + 10
    while backplane.messages < messages + 4:
        assert time.monotonic() < deadline, "the messages never arrived"
        time.sleep(0.01)
    assert backplane.drops == drops and backplane.connected
    cache.invalidate_tags("t")  # and a real invalidation still works after them
    assert cache.get("k") is None


# -- the stamp: tag ids and one digest of their versions ------------------------------------------------------
THREE = ["catalogue", "shop:12", "price-list"]
# Two tag names with one 32-bit id (found by a birthday search): they share a tag key.
TWIN, OTHER_TWIN = "twin:25487", "twin:53815"


def _strict(cache):
    """A second cache on the same KEY_PREFIX that holds nothing in-process: it reads every version."""
    return make_cache(KEY_PREFIX=cache.key_prefix, OPTIONS={"VERSION_CHECK_INTERVAL": 0})


@pytest.mark.parametrize("invalidated", THREE)
def test_invalidating_any_one_of_three_tags_makes_the_entry_miss(cache, invalidated):
    strict = _strict(cache)
    cache.set("k", "v", tags=THREE)
    cache.set_many({"m": 1, "n": 2}, tags=THREE)
    assert cache.get_or_set("o", lambda: "computed", tags=THREE) == "computed"
    for reader in (cache, strict):  # versions held in-process, and read from Redis
        assert reader.get_many(["k", "m", "n", "o"]) == {"k": "v", "m": 1, "n": 2, "o": "computed"}
    cache.invalidate_tags(invalidated)
    for reader in (cache, strict):
        assert reader.get("k") is None and reader.has_key("m") is False
        assert reader.get_many(["k", "m", "n", "o"]) == {}
    assert cache.get_or_set("o", lambda: "again", tags=THREE) == "again"  # a new write is valid at once
    assert strict.get("o") == "again"


@pytest.mark.parametrize("vanished", THREE)
def test_an_entry_misses_when_any_one_of_its_tag_keys_vanished(cache, raw, vanished):
    strict = _strict(cache)
    cache.set("k", "v", tags=THREE)
    assert strict.get("k") == "v"
    raw.delete(cache.core.tags.tag_key(vanished))  # evicted, expired, lost in a failover
    assert strict.get("k") is None and strict.get_many(["k"]) == {}


def test_a_forged_stamp_is_refused(cache, raw):
    from django_distcache.codec import TAG_DIGEST_SIZE, TAG_ID_SIZE, tag_digest, tag_id

    strict = _strict(cache)
    cache.set("k", "v", tags=THREE)
    physical = cache.physical_key("k")
    genuine = raw.get(physical)
    cache.invalidate_tags("shop:12")
    assert strict.get("k") is None
    # Whoever can write to Redis (but lacks SECRET_KEY) can compute the digest of the current versions,
    # which is not secret; the signature over the header still refuses the entry.
    ids = sorted(tag_id(tag) for tag in THREE)
    current = {tag_id(tag): int(raw.get(cache.core.tags.tag_key(tag))) for tag in THREE}
    start = 2 + 1 + TAG_ID_SIZE * 3  # magic, descriptor, count, ids: the digest
    forged = genuine[:start] + tag_digest(ids, current) + genuine[start + TAG_DIGEST_SIZE :]
    assert forged != genuine
    before = strict.failure_counts.get("undecodable", 0)
    raw.set(physical, forged)
    assert strict.get("k") is None and strict.get_many(["k"]) == {}
    assert strict.failure_counts["undecodable"] > before  # refused as forged, not read as stale
    raw.set(physical, genuine)  # the genuine bytes are still what they were: stale, a miss
    assert strict.get("k") is None


def test_tags_that_share_a_key_invalidate_each_other_and_never_serve_stale(cache, raw):
    from django_distcache.codec import tag_id

    assert tag_id(TWIN) == tag_id(OTHER_TWIN) and TWIN != OTHER_TWIN
    assert cache.core.tags.tag_key(TWIN) == cache.core.tags.tag_key(OTHER_TWIN)
    strict = _strict(cache)
    cache.set("a", "carries one twin", tags=[TWIN])
    cache.set("both", "carries both", tags=[TWIN, OTHER_TWIN, "catalogue"])
    for reader in (cache, strict):
        assert reader.get_many(["a", "both"]) == {"a": "carries one twin", "both": "carries both"}
    assert cache.invalidate_tags(OTHER_TWIN) == 1
    for reader in (cache, strict):
        assert reader.get_many(["a", "both"]) == {}  # more misses, never a stale read
    cache.set("a", "again", tags=[TWIN])
    assert strict.get("a") == "again"
    assert cache.invalidate_tags(TWIN, OTHER_TWIN) == 2  # one key, counted as the two tags asked for
    assert strict.get("a") is None


def test_an_invalidation_of_a_twin_reaches_another_process_holding_the_other(cache):
    cache.set("a", "v", tags=[TWIN])
    with Peer(cache.key_prefix) as other:
        other.wait_connected()
        assert other.get("a") == "v"
        assert other.get("a") == "v"
        assert other.ask("stats")["held_tags"] >= 1
        cache.invalidate_tags(OTHER_TWIN)  # the push names OTHER_TWIN: the other process hashes it
        other.wait_for_miss("a", within=1.0)


def test_a_queued_invalidation_of_a_twin_blocks_entries_carrying_the_other(cache):
    cache.set("a", "v", tags=[TWIN, "catalogue"])
    assert cache.get("a") == "v"
    outbox = cache.core.tags.outbox
    outbox.add({OTHER_TWIN: 1234})  # as if its node had been unreachable
    assert cache.get("a") is None and cache.get_many(["a"]) == {}
    deadline = time.monotonic() + 10
    while not outbox.empty:
        assert time.monotonic() < deadline, "the outbox did not land"
        time.sleep(0.02)
    assert cache.get("a") is None
    cache.set("a", "after", tags=[TWIN, "catalogue"])  # landed: no longer blocks what is written now
    assert cache.get("a") == "after"
