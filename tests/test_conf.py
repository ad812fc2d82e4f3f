"""LOCATION and OPTIONS are validated once, with messages that say what to fix; every option reaches its
typed attribute and has its effect; the options table of docs/configuration.md is the one conf.py renders;
the old option names still work, with a DeprecationWarning."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import time
import uuid
import zlib
from pathlib import Path

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured
from hypothesis import given
from hypothesis import strategies as st
from redis.cluster import RedisCluster

from django_distcache import conf
from django_distcache.cache import CacheUnavailable
from django_distcache.conf import DEFAULTS, NodeAddress, parse_location, parse_settings
from tests.conftest import make_cache, wait_for_backplane

ROOT = Path(__file__).resolve().parent.parent


def test_location_forms():
    assert parse_location("redis://a:1")[0] == (NodeAddress("a", 1),)
    assert parse_location("redis://a:1, redis://b:2")[0] == (NodeAddress("a", 1), NodeAddress("b", 2))
    nodes, credentials = parse_location(["rediss://user:p%40ss@a:1", "rediss://a:1"])
    assert nodes == (NodeAddress("a", 1),)
    assert credentials == {"username": "user", "password": "p@ss", "ssl": True}


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("", "empty"),
        ([], "empty"),
        ("http://a:1", "redis://"),
        ("redis://a:99999", "invalid port"),
        ("redis://a:1/3", "database"),
        (["redis://a:1", "rediss://b:2"], "mixes"),
        (42, "URL"),
    ],
)
def test_bad_locations(location, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        parse_location(location)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"FAILURE_POLICY": "ignore"}, "FAILURE_POLICY"),
        ({"SOCKET_TIMEOUT": -1}, "SOCKET_TIMEOUT"),
        ({"SOCKET_TIMEOUT": "1"}, "SOCKET_TIMEOUT"),
        ({"SSL": "yes"}, "SSL"),
        ({"BOGUS": 1}, "unknown OPTIONS"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        parse_settings("redis://a:1", options)


def test_tls_and_credentials_reach_the_connection_settings():
    settings = parse_settings(
        "rediss://a:1", {"USERNAME": "app", "PASSWORD": "secret", "SSL": {"ssl_cert_reqs": "none"}}
    )
    assert settings.connection.ssl is True
    assert settings.connection.username == "app" and settings.connection.password == "secret"
    assert settings.connection.ssl_options == {"ssl_cert_reqs": "none"}


@given(st.text())
def test_any_location_string_is_accepted_or_refused_cleanly(text):
    try:
        parse_location(text)
    except ImproperlyConfigured:
        pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"SERIALIZER": "django_redis.serializers.json.JSONSerializer"}, "django-redis.*use 'json'"),
        ({"SERIALIZER": "django_redis.serializers.pickle.PickleSerializer"}, "use 'pickle'"),
        ({"COMPRESSOR": "django_redis.compressors.zlib.ZlibCompressor"}, "use 'zlib'"),
        ({"COMPRESSOR": "django_redis.compressors.lz4.Lz4Compressor"}, "choose one of"),
        ({"SERIALIZER": "json.JSONDecoder"}, "no 'id'|integer 'id'"),
        ({"SERIALIZER": "decimal.Decimal"}, "integer 'id'"),
        ({"SERIALIZER": 42}, "class"),
        ({"SOCKET_TIMEOUT": float("nan")}, "SOCKET_TIMEOUT"),
    ],
)
def test_plugins_that_cannot_work_here_are_refused_at_configuration(options, message):
    """A django-redis class left in settings after a migration takes arguments ours are never given: it
    used to fail with a raw TypeError at the first cache access."""
    from django_distcache.conf import build_codec

    with pytest.raises(ImproperlyConfigured, match=message):
        build_codec(parse_settings("redis://a:1", options))


def test_a_plugin_class_must_have_the_methods_the_codec_calls():
    from django_distcache.conf import build_codec

    class NoLoads:
        id, name = 100, "half"

        def dumps(self, value):
            return b""

    class NeedsArguments:
        id, name = 101, "args"

        def __init__(self, options):
            self.options = options

    with pytest.raises(ImproperlyConfigured, match="loads"):
        build_codec(parse_settings("redis://a:1", {"SERIALIZER": NoLoads}))
    with pytest.raises(ImproperlyConfigured, match="without arguments"):
        build_codec(parse_settings("redis://a:1", {"SERIALIZER": NeedsArguments}))


# -- the table of options -----------------------------------------------------------------------------------
def test_the_docs_options_table_is_the_one_conf_renders():
    path = ROOT / "docs" / "configuration.md"
    text = path.read_text(encoding="utf-8")
    assert conf.with_options_table(text) == text, "run `make docs-options` to regenerate the table"
    for entry in conf.OPTIONS:
        assert f"| `{entry.name}` | `OPTIONS` |" in text


# A value other than the default for every option, and the typed attribute it becomes. A new option needs a
# line here (the first assertion): that is how every option is set by at least one test.
SAMPLES = {
    "SERIALIZER": ("json", "json"),
    "PICKLE_PROTOCOL": (2, 2),
    "COMPRESSOR": ("zlib", "zlib"),
    "COMPRESS_MIN_SIZE": (10, 10),
    "COMPRESS_LEVEL": (1, 1),
    "MAX_VALUE_SIZE": (None, None),
    "SIGNING_KEY": ("another secret", "another secret"),
    "SOCKET_TIMEOUT": (1, 1.0),
    "SOCKET_CONNECT_TIMEOUT": (None, None),
    "RETRIES": (0, 0),
    "READ_FROM_REPLICAS": ("fallback", "fallback"),
    "USERNAME": ("app", "app"),
    "PASSWORD": ("s3cret", "s3cret"),
    "SSL": ({"ssl_cert_reqs": "none"}, {"ssl_cert_reqs": "none"}),
    "FAILURE_POLICY": ("raise", "raise"),
    "BREAKER_THRESHOLD": (5, 5),
    "BREAKER_COOLDOWN": (2, 2.0),
    "FAILOVER_REPAIR_WINDOW": (0, 0.0),
    "VERSION_CHECK_INTERVAL": (0, 0.0),
    "OUTBOX_DIR": ("/var/tmp/outbox", Path("/var/tmp/outbox")),
    "STAMPEDE_LEASE_TIMEOUT": (3, 3.0),
    "XFETCH_BETA": (0, 0.0),
    "BEHIND_SHARDS": (2, 2),
    "BEHIND_BATCH_SIZE": (10, 10),
    "BEHIND_IDLE_TIMEOUT": (5, 5.0),
    "BEHIND_MAX_ATTEMPTS": (2, 2),
    "BEHIND_TRIGGER_BACKLOG": (0, 0),
    "BEHIND_WAIT_REPLICAS": (1, 1),
    "BEHIND_WAIT_TIMEOUT": (1, 1.0),
}


def test_every_option_given_reaches_its_typed_attribute():
    assert sorted(SAMPLES) == sorted(DEFAULTS)
    settings = parse_settings("redis://a:1", {name: value for name, (value, _) in SAMPLES.items()})
    for name, (_given, typed) in SAMPLES.items():
        attribute = getattr(settings, name.lower())
        assert attribute == typed and type(attribute) is type(typed), name
    assert settings.namespace_check_interval == 0.0
    assert settings.connection.retries == 0 and settings.connection.replica_fallback
    assert settings.connection.breaker_threshold == 5 and settings.connection.repair_window == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.behind_shards = 3  # type: ignore[misc]


def test_the_defaults_reach_the_typed_attributes():
    settings = parse_settings("redis://a:1", {})
    assert {entry.name: getattr(settings, entry.attribute) for entry in conf.OPTIONS} == {
        entry.name: entry.parse(entry.default) for entry in conf.OPTIONS
    }
    assert (settings.behind_shards, settings.xfetch_beta, settings.version_check_interval) == (8, 1.0, 1.0)
    assert type(settings.xfetch_beta) is float and type(settings.max_value_size) is int
    assert settings.outbox_dir == conf.default_outbox_dir()
    assert parse_settings("redis://a:1", {"OUTBOX_DIR": False}).outbox_dir is None
    assert settings.connection.topology_refresh_interval == conf.TOPOLOGY_REFRESH_INTERVAL


def _message(name, must_be, value):
    return "^" + re.escape(f"django_distcache: OPTIONS[{name!r}] must be {must_be}, got {value!r}") + "$"


@pytest.mark.parametrize(
    ("name", "value", "must_be"),
    [
        # non_negative
        ("BREAKER_COOLDOWN", -1, "a non-negative number"),
        ("XFETCH_BETA", True, "a non-negative number"),
        ("VERSION_CHECK_INTERVAL", float("nan"), "a non-negative number"),
        ("SOCKET_TIMEOUT", "1", "a non-negative number or None"),
        # positive
        ("STAMPEDE_LEASE_TIMEOUT", 0, "a number more than 0"),
        # whole
        ("BEHIND_SHARDS", 0, "a whole number of at least 1"),
        ("BEHIND_MAX_ATTEMPTS", 2.0, "a whole number of at least 1"),
        ("RETRIES", -1, "a non-negative whole number"),
        ("BEHIND_WAIT_REPLICAS", 0.5, "a non-negative whole number"),
        (
            "PICKLE_PROTOCOL",
            pickle.HIGHEST_PROTOCOL + 1,
            f"a whole number from 0 to {pickle.HIGHEST_PROTOCOL} or None",
        ),
        ("COMPRESS_LEVEL", "9", "a whole number or None"),
        ("MAX_VALUE_SIZE", 1.5, "a non-negative whole number or None"),
        # one_of: compared with their types, so 1 is not True
        ("FAILURE_POLICY", "ignore", "one of 'miss', 'raise'"),
        ("READ_FROM_REPLICAS", 1, "one of False, True, 'fallback'"),
        # optional(text), mapping, directory, plugin
        ("USERNAME", 5, "a string or None"),
        ("SIGNING_KEY", b"bytes", "a string or None"),
        ("SSL", "yes", "a dict of redis-py ssl_* connection arguments or None"),
        ("OUTBOX_DIR", True, "a directory path, None (the default place) or False (none)"),
        (
            "SERIALIZER",
            42,
            "one of ['json', 'msgpack', 'pickle'], a dotted path to a serializer class, or the class itself",
        ),
        (
            "COMPRESSOR",
            None,
            "one of ['none', 'zlib', 'zstd'], a dotted path to a compressor class, or the class itself",
        ),
    ],
)
def test_each_check_says_what_the_option_must_be(name, value, must_be):
    with pytest.raises(ImproperlyConfigured, match=_message(name, must_be, value)):
        parse_settings("redis://a:1", {name: value})


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_every_option_refuses_a_value_of_no_kind_it_takes(name):
    with pytest.raises(ImproperlyConfigured, match=re.escape(f"OPTIONS[{name!r}] must be ")):
        parse_settings("redis://a:1", {name: object()})


def test_an_unknown_option_lists_the_known_ones():
    with pytest.raises(ImproperlyConfigured) as raised:
        parse_settings("redis://a:1", {"BEHIND_SHARD": 2})
    assert str(raised.value) == (
        f"django_distcache: unknown OPTIONS ['BEHIND_SHARD']; known options: {sorted(DEFAULTS)}"
    )


# -- the old names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old", ["NAMESPACE_CHECK_INTERVAL", "TAG_VERSION_TTL"])
def test_a_renamed_option_still_works_and_names_its_replacement(old):
    with pytest.warns(DeprecationWarning, match=rf"OPTIONS\['{old}'\].*OPTIONS\['VERSION_CHECK_INTERVAL'\]"):
        settings = parse_settings("redis://a:1", {old: 5})
    assert settings.version_check_interval == settings.namespace_check_interval == 5.0
    with pytest.raises(ImproperlyConfigured, match=_message(old, "a non-negative number", -1)):
        parse_settings("redis://a:1", {old: -1})


def test_the_two_merged_names_keep_the_stricter_bound_unless_the_new_name_is_given():
    with pytest.warns(DeprecationWarning):
        both = parse_settings("redis://a:1", {"NAMESPACE_CHECK_INTERVAL": 2, "TAG_VERSION_TTL": 0.5})
    assert both.version_check_interval == 0.5
    with pytest.warns(DeprecationWarning):
        explicit = parse_settings("redis://a:1", {"TAG_VERSION_TTL": 0, "VERSION_CHECK_INTERVAL": 3})
    assert explicit.version_check_interval == 3.0


@pytest.mark.parametrize("old", ["TOPOLOGY_REFRESH_INTERVAL", "OUTBOX_SIZE"])
def test_an_option_that_became_an_internal_bound_is_ignored_with_a_warning(old):
    with pytest.warns(DeprecationWarning, match=rf"OPTIONS\['{old}'\] is ignored: .*internal bound"):
        settings = parse_settings("redis://a:1", {old: 7})
    assert settings.connection.topology_refresh_interval == conf.TOPOLOGY_REFRESH_INTERVAL
    assert not hasattr(settings, "outbox_size")
    assert old not in DEFAULTS


def test_the_old_tag_version_name_still_makes_every_tagged_read_ask_redis(cluster):
    with pytest.warns(DeprecationWarning, match="VERSION_CHECK_INTERVAL"):
        strict = make_cache(OPTIONS={"TAG_VERSION_TTL": 0})
    strict.set("k", "v", tags=["t"])
    assert strict.get("k") == "v"
    with _raw(cluster) as raw:
        raw.set(strict.core.tags.tag_key("t"), 1)  # changed behind its back, no message
    assert strict.get("k") is None


# -- each option has its effect ----------------------------------------------------------------------------
class _raw:
    """A plain cluster client, to look at what the cache stored and to change it behind its back."""

    def __init__(self, cluster):
        self.client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])

    def __enter__(self):
        return self.client

    def __exit__(self, *exc_info):
        self.client.close()


def test_pickle_protocol_is_the_protocol_values_are_stored_in(cluster):
    from django_distcache.codec import MAC_SIZE

    value = {"answer": 42, "items": [1.5, "two"]}
    with _raw(cluster) as raw:
        for protocol in (2, None):
            cache = make_cache(OPTIONS={"PICKLE_PROTOCOL": protocol})
            cache.set("k", value)
            stored = raw.get(cache.physical_key("k"))[:-MAC_SIZE]  # the signature ends the envelope
            assert stored.endswith(pickle.dumps(value, protocol or pickle.HIGHEST_PROTOCOL)), protocol
            assert cache.get("k") == value


def test_compress_level_is_the_level_values_are_compressed_at(cluster):
    from django_distcache.codec import MAC_SIZE

    value = " ".join(str(i * 7919 % 10007) for i in range(5000))
    serialized = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    assert zlib.compress(serialized, 1) != zlib.compress(serialized, 9)
    with _raw(cluster) as raw:
        for level in (1, 9):
            cache = make_cache(OPTIONS={"COMPRESSOR": "zlib", "COMPRESS_LEVEL": level})
            cache.set("k", value)
            stored = raw.get(cache.physical_key("k"))[:-MAC_SIZE]  # the signature ends the envelope
            assert stored.endswith(zlib.compress(serialized, level)), level
            assert cache.get("k") == value


@pytest.fixture
def own_user(cluster):
    """An ACL user of this test's own on every node, so that killing its connections touches no one else's."""
    name, password = f"conf-{uuid.uuid4().hex[:8]}", "pw"
    nodes = [redis.Redis(port=port) for port in cluster.ports]
    for node in nodes:
        node.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", "+@all")
    yield name, password, nodes
    for node in nodes:
        node.execute_command("ACL", "DELUSER", name)
        node.close()


@pytest.mark.parametrize("retries", [0, 10])
def test_retries_is_how_often_a_read_is_sent_again_after_its_connection_dropped(own_user, retries):
    name, password, nodes = own_user
    options = {"USERNAME": name, "PASSWORD": password, "RETRIES": retries, "FAILURE_POLICY": "raise"}
    # A high breaker threshold: each resend that meets another dropped connection counts as a failure.
    cache = make_cache(OPTIONS={**options, "BREAKER_THRESHOLD": 20, "VERSION_CHECK_INTERVAL": 60})
    wait_for_backplane(cache)  # the namespace generation is then held: a get sends one command, its GET
    cache.set("k", "v")
    assert cache.get("k") == "v"
    for node in nodes:  # the server closes the idle connections the cache holds
        dropped = node.execute_command("CLIENT", "KILL", "USER", name, "TYPE", "normal")
        assert dropped <= 10  # each resend may meet one of them before a new connection is opened
    if retries:
        assert cache.get("k") == "v"
    else:
        with pytest.raises(CacheUnavailable, match="Connection closed by server"):
            cache.get("k")


@pytest.mark.parametrize("interval", [0, 60])
def test_version_check_interval_bounds_how_long_a_namespace_generation_is_trusted(cluster, interval):
    cache = make_cache(OPTIONS={"VERSION_CHECK_INTERVAL": interval})
    wait_for_backplane(cache)
    cache.set("k", "v")
    assert cache.get("k") == "v"
    with _raw(cluster) as raw:
        raw.set(cache.core.namespace.key, "another-generation")  # a clear() whose push was lost
        if interval:
            assert cache.get("k") == "v"  # the generation held is trusted for the interval
        else:
            assert cache.get("k") is None  # every command reads the generation
        raw.delete(cache.core.namespace.key)


def test_outbox_dir_is_where_pending_invalidations_are_recorded(tmp_path):
    cache = make_cache(OPTIONS={"OUTBOX_DIR": str(tmp_path)})
    cache.set("k", "v", tags=["t"])
    outbox = cache.core.tags.outbox
    outbox.add({"t": 99})  # as if the tag's node had been unreachable
    assert [path.name for path in tmp_path.iterdir()] == [f"{cache.key_prefix}.{os.getpid()}.json"]
    deadline = time.monotonic() + 10
    while not outbox.empty:
        assert time.monotonic() < deadline, "the outbox did not land"
        time.sleep(0.02)
    assert list(tmp_path.iterdir()) == []


def test_outbox_dir_false_records_nothing():
    cache = make_cache(OPTIONS={"OUTBOX_DIR": False})
    outbox = cache.core.tags.outbox
    outbox.add({"t": 99})
    assert not list(conf.default_outbox_dir().glob(f"{cache.key_prefix}.*"))
    deadline = time.monotonic() + 10
    while not outbox.empty:
        assert time.monotonic() < deadline, "the outbox did not land"
        time.sleep(0.02)


@pytest.mark.parametrize(("beta", "recomputed"), [(0, False), (1e12, True)])
def test_xfetch_beta_is_how_eagerly_an_entry_is_recomputed_before_it_expires(beta, recomputed):
    cache = make_cache(OPTIONS={"XFETCH_BETA": beta})

    def slow_first():
        time.sleep(0.02)  # XFetch weighs the time the computation took
        return "first"

    assert cache.get_or_set("k", slow_first, timeout=60) == "first"
    expected = "second" if recomputed else "first"
    assert cache.get_or_set("k", lambda: "second", timeout=60) == expected
    assert cache.get("k") == expected
