"""Key layout: every key and the channel of a cache start with `<KEY_PREFIX>:`, so a Redis ACL user
limited to that prefix (the recipe of docs/security.md, created on every node) runs the whole cache; a
refused command is a clear error and leaves nothing half done."""

from __future__ import annotations

import shlex
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

import django_distcache
from django_distcache.codec import tag_id
from django_distcache.keys import glob_escape
from django_distcache.topology import PermissionRefusedError
from tests.conftest import make_cache, wait_replicas_listed
from tests.test_docs import fenced_blocks

SECURITY_DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"


@pytest.fixture
def raw(cluster):
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


def documented_acl_rules(key_prefix: str) -> list[str]:
    """The `ACL SETUSER` rules of docs/security.md, verbatim, for `key_prefix` instead of `shop` (and the
    password "pw")."""
    (block,) = [b for b in fenced_blocks(SECURITY_DOC) if b.language == "shell" and "SETUSER" in b.code]
    words = shlex.split(block.code.replace("\\\n", " "))
    rules = words[words.index("SETUSER") + 2 :]
    assert {"~shop:*", "&shop:*", ">change-me"} <= set(rules), rules
    pattern = glob_escape(f"{key_prefix}:") + "*"
    substitutes = {"~shop:*": f"~{pattern}", "&shop:*": f"&{pattern}", ">change-me": ">pw"}
    return [substitutes.get(rule, rule) for rule in rules]


@pytest.fixture(scope="session")
def acl_user(cluster):
    """acl_user(rules) -> the name of a new Redis user with `rules` (password "pw"), created on every node,
    primaries and replicas (ACLs are per node). Every user is deleted at the end of the session: the caches
    created for them keep background threads, which must not fail before the session ends."""
    names = []

    def create(rules: list[str]) -> str:
        name = f"acl-{uuid.uuid4().hex[:8]}"
        for port in cluster.ports:
            redis.Redis(port=port).execute_command("ACL", "SETUSER", name, *rules)
        names.append(name)
        return name

    yield create
    for name in names:
        for port in cluster.ports:
            redis.Redis(port=port).execute_command("ACL", "DELUSER", name)


def acl_cache(acl_user, rules_for, **overrides):
    """A cache of its own KEY_PREFIX whose Redis user has `rules_for(key_prefix)`."""
    key_prefix = overrides.pop("KEY_PREFIX", f"acl-{uuid.uuid4().hex[:10]}")
    user = acl_user(rules_for(key_prefix))
    options = {"USERNAME": user, "PASSWORD": "pw", **overrides.pop("OPTIONS", {})}
    return make_cache(KEY_PREFIX=key_prefix, OPTIONS=options, **overrides)


def without(*commands):
    def rules_for(key_prefix):
        return [rule for rule in documented_acl_rules(key_prefix) if rule not in commands]

    return rules_for


def wait_until(condition, timeout=10.0, message="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {message}"
        time.sleep(0.02)


def keys_of(raw, key_prefix: str) -> list[bytes]:
    """Every key of the cluster that mentions `key_prefix` anywhere."""
    match = "*" + glob_escape(key_prefix) + "*"
    return list(raw.scan_iter(match=match, target_nodes=RedisCluster.PRIMARIES))


# -- layout -------------------------------------------------------------------------------------------
def test_every_key_and_the_channel_of_a_cache_start_with_its_key_prefix(cache, raw):
    cache.set("plain", "v")
    cache.set("tagged", "v", tags=["t"])
    cache.invalidate_tags("other")
    assert cache.get_or_set("computed", lambda: "v", tags=["t"]) == "v"  # takes and releases a lease
    held = cache.lock("job", timeout=30)
    assert held.acquire(blocking=False)
    cache.clear()  # the namespace key and the purge list
    cache.set("after", 1)
    found = keys_of(raw, cache.key_prefix)
    held.release()
    # the tag carried by entries, the lock, the namespace, the entry written after clear() (the purge list
    # may be gone already; invalidating "other", which nothing carries, created no key)
    assert len(found) >= 4
    assert all(key.startswith(f"{cache.key_prefix}:".encode()) for key in found), found
    assert cache.core.backplane.channel == f"{cache.key_prefix}:~{{invalidations}}".encode()
    generation = cache.core.namespace.head.split(b":")[1]
    assert cache.physical_key("after") == f"{cache.key_prefix}:{generation.decode()}:1:after".encode()


def test_the_empty_default_key_prefix_puts_every_key_under_a_colon(raw):
    cache = make_cache(KEY_PREFIX="")
    cache.set("k", "v", tags=["t"])
    assert cache.physical_key("k").startswith(b":") and cache.physical_key("k").endswith(b":1:k")
    assert cache.core.tags.tag_key("t") == b":~tag:%08x" % tag_id("t") and cache.core.namespace.key == b":~ns"
    assert cache.get("k") == "v"
    cache.delete("k")


def test_a_custom_key_function_keeps_its_whole_key_after_the_generation(raw):
    cache = make_cache(KEY_FUNCTION=lambda key, prefix, version: f"{version}|{key}")
    cache.set("k", ["v"])
    generation = cache.core.namespace.head.split(b":")[1].decode()
    assert cache.physical_key("k") == f"{cache.key_prefix}:{generation}:1|k".encode()
    assert cache.get("k") == ["v"]
    cache.clear()
    assert cache.get("k") is None


def test_the_purge_of_a_prefix_with_glob_characters_matches_only_its_own_keys(raw):
    """`SCAN MATCH <prefix>:<generation>:*` with the prefix's `*` escaped: unescaped, it would also match a
    key of the prefix without the star that contains the generation."""
    base = f"g-{uuid.uuid4().hex[:8]}"
    starred, plain = make_cache(KEY_PREFIX=base + "*"), make_cache(KEY_PREFIX=base)
    starred.set("k", 1)
    retired = starred.physical_key("k")
    generation = retired.split(b":")[1].decode()
    plain.set(f"x:{generation}:y", "kept")
    starred.clear()
    assert starred.core.shared.purger.idle.wait(30)
    assert raw.exists(retired) == 0
    assert plain.get(f"x:{generation}:y") == "kept"


def test_a_namespace_key_that_holds_no_generation_is_replaced(raw):
    cache = make_cache()
    raw.set(cache.core.namespace.key, "not a generation*")
    cache.set("k", "v")
    assert cache.get("k") == "v"
    assert raw.get(cache.core.namespace.key) == cache.core.namespace.head.split(b":")[1]


# -- a least-privilege ACL user ----------------------------------------------------------------------
def test_the_documented_acl_runs_the_whole_cache(acl_user, raw):
    cache = acl_cache(acl_user, documented_acl_rules)
    cache.set("a", {"x": 1}, tags=["t1"])
    assert cache.get("a") == {"x": 1}
    assert cache.add("n", 1) is True
    cache.set_many({"b": "two", "c": 3})
    assert cache.get_many(["a", "b", "c", "missing"]) == {"a": {"x": 1}, "b": "two", "c": 3}
    assert cache.incr("n", 5) == 6 and cache.decr("n") == 5
    assert cache.touch("n", 100) is True and 0 < cache.ttl("n") <= 100
    assert cache.persist("n") is True and cache.ttl("n") is None
    assert cache.has_key("a")
    cache.delete_many(["c"])
    assert cache.delete("b") is True
    assert cache.get_or_set("computed", lambda: "v", tags=["t2"]) == "v"
    assert cache.incr_version("computed") == 2 and cache.get("computed", version=2) == "v"
    assert cache.invalidate_tags("t1") == 1
    assert cache.get("a") is None
    lock = cache.lock("job", timeout=10)
    assert lock.acquire(blocking=False)
    lock.release()
    wait_until(lambda: cache.core.backplane.connected, message="the invalidation channel")
    retired = cache.physical_key("n")
    cache.clear()
    assert cache.get("n") is None
    assert cache.core.shared.purger.idle.wait(30)
    assert raw.exists(retired) == 0  # purged through the ACL user's SCAN and UNLINK
    assert cache.failure_counts.get("undecodable", 0) == 0


def test_the_documented_acl_reads_from_replicas(acl_user, cluster):
    """The user exists on the replicas too (ACLs are per node): READONLY and reads work there."""
    wait_replicas_listed(cluster)
    cache = acl_cache(acl_user, documented_acl_rules, OPTIONS={"READ_FROM_REPLICAS": True})
    cache.set("k", "v")
    wait_until(lambda: cache.get("k") == "v", message="the write to reach a replica")
    state = cache.core.shared.state
    replica = state.slot_map.node_for(cache.physical_key("k"), read=True, use_replicas=True)
    assert replica not in state.slot_map.primary_nodes


async def test_the_documented_acl_runs_the_async_side(acl_user):
    cache = acl_cache(acl_user, documented_acl_rules)
    await cache.aset("k", "v", tags=["t"])
    assert await cache.aget("k") == "v"
    assert await cache.ainvalidate_tags("t") == 1
    assert await cache.aget("k") is None


@pytest.mark.django_db(transaction=True)
def test_the_documented_acl_runs_model_caching_and_write_behind(acl_user, settings):
    from tests.model_app.models import PageCounter, Product

    cache = acl_cache(acl_user, documented_acl_rules)
    default = settings.CACHES["default"]
    credentials = {"USERNAME": cache.core.settings.connection.username, "PASSWORD": "pw"}
    settings.CACHES = {
        "default": {
            **default,
            "KEY_PREFIX": cache.key_prefix,
            "OPTIONS": {**default["OPTIONS"], **credentials},
        }
    }
    product = Product.objects.create(name="Shoe", slug="shoe", price=Decimal("9.50"))
    assert django_distcache.get_cached(Product, slug="shoe").pk == product.pk
    product.name = "Red shoe"
    product.save()  # write-through: the epoch, the row tag, the entries
    assert django_distcache.get_cached(Product, slug="shoe").name == "Red shoe"
    counter = PageCounter.objects.create(name="home")
    counter.views = 7
    django_distcache.save_behind(counter, update_fields=["views"])
    assert django_distcache.get_cached(PageCounter, pk=counter.pk).views == 7
    report = django_distcache.flush_behind()
    assert (report.changes_applied, report.rows_written) == (1, 1)
    assert PageCounter.objects.get(pk=counter.pk).views == 7
    assert django_distcache.behind_metrics()["backlog"] == 0


def test_a_refused_command_is_an_error_naming_it_never_a_miss(acl_user):
    """Patterns for another prefix: whatever the failure policy, a refusal is not an outage."""
    cache = acl_cache(acl_user, lambda prefix: documented_acl_rules(prefix + "-other"))
    with pytest.raises(PermissionRefusedError, match=r"SET on key '.*:~ns'") as refused:
        cache.get("k")
    assert f"~{cache.key_prefix}:*" in "".join(refused.value.__notes__)


def test_a_user_that_may_not_read_the_slot_map_gets_an_error_not_an_outage(acl_user):
    cache = acl_cache(acl_user, without("+cluster|slots"))
    with pytest.raises(PermissionRefusedError, match="CLUSTER SLOTS"):
        cache.get("k")
    assert cache.failure_counts.get("get", 0) == 0


def test_a_refused_script_command_names_the_script_commands(acl_user):
    cache = acl_cache(acl_user, without("+incrby"))
    cache.set("n", 1)
    with pytest.raises(PermissionRefusedError, match=r"commands of a script \(EXISTS, INCRBY\)"):
        cache.incr("n")
    assert cache.get("n") == 1


def test_clear_without_rpush_raises_and_leaves_the_namespace_as_it_was(acl_user, raw):
    cache = acl_cache(acl_user, without("+rpush"))
    cache.set("k", "v")
    before = cache.physical_key("k")
    with pytest.raises(PermissionRefusedError, match=rf"RPUSH on key '{cache.key_prefix}:~purge'"):
        cache.clear()
    assert raw.get(cache.core.namespace.key) == before.split(b":")[1]
    assert cache.physical_key("k") == before
    assert cache.get("k") == "v"


def test_a_purge_without_scan_logs_a_clear_error_and_leaves_the_generation_listed(
    acl_user, raw, caplog, monkeypatch
):
    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    cache = acl_cache(acl_user, without("+scan"))
    cache.set("k", "v")
    retired = cache.physical_key("k")
    generation = retired.split(b":")[1]
    with caplog.at_level("ERROR", logger="django_distcache.versioning"):
        assert cache.clear() is True
        assert cache.core.shared.purger.idle.wait(30)
    errors = [record for record in caplog.records if record.name == "django_distcache.versioning"]
    # One error per purge attempt (the purge of what an earlier process left listed may try too), each
    # naming what was refused; no traceback, no thread dying.
    assert errors and all("refused SCAN" in record.getMessage() for record in errors), errors
    assert crashed == []
    assert generation in raw.lrange(cache.core.namespace.purge_list, 0, -1)
    assert raw.get(retired) is not None  # not purged, still listed for a later purge
    assert cache.get("k") is None


def test_the_acl_patterns_in_the_error_note_escape_glob_characters():
    from django_distcache.keys import KeyLayout

    assert KeyLayout("a*b[1]", True).acl_patterns() == r"~a\*b\[1\]:* &a\*b\[1\]:*"
    assert KeyLayout("", True).acl_patterns() == "~:* &:*"
