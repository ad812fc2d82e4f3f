"""LOCATION and OPTIONS are validated once, with messages that say what to fix."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from hypothesis import given
from hypothesis import strategies as st

from django_distcache.conf import NodeAddress, parse_location, parse_settings


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
