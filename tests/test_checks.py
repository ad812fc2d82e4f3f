"""`manage.py check` reports a CACHES entry that cannot work: bad options, no cluster, not a cluster."""

from __future__ import annotations

import io
import socket
import subprocess
import time

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from django_distcache.devcluster import find_server_binary

BACKEND = "django_distcache.cache.RedisClusterCache"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def standalone_redis(tmp_path):
    """A plain (non-cluster) Redis server of the test's own."""
    port = _free_port()
    process = subprocess.Popen(
        [
            find_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port
    process.terminate()
    process.wait(10)


def _check_output(caches) -> str:
    from django.core.cache import caches as handler

    with override_settings(CACHES=caches):
        handler._settings = None  # noqa: SLF001 - rebuild from the overridden setting
        try:
            call_command("check", stdout=io.StringIO(), stderr=io.StringIO())
        except SystemCheckError as error:
            return str(error)
        return ""


def test_check_passes_on_the_running_cluster(settings):
    assert _check_output({"default": {"BACKEND": BACKEND, "LOCATION": settings.CLUSTER_LOCATION}}) == ""


def test_check_reports_an_unreachable_cluster():
    output = _check_output({"default": {"BACKEND": BACKEND, "LOCATION": f"redis://127.0.0.1:{_free_port()}"}})
    assert "django_distcache.E003" in output and "unreachable" in output


def test_check_reports_a_server_that_is_not_a_cluster(standalone_redis):
    output = _check_output(
        {"default": {"BACKEND": BACKEND, "LOCATION": f"redis://127.0.0.1:{standalone_redis}"}}
    )
    assert "django_distcache.E002" in output and "without cluster mode" in output


def test_check_fails_with_a_clear_message_on_bad_options(settings):
    bad = {"BACKEND": BACKEND, "LOCATION": settings.CLUSTER_LOCATION, "OPTIONS": {"SERIALIZER": "yaml"}}
    with pytest.raises(ImproperlyConfigured, match="unknown serializer 'yaml'"):
        _check_output({"default": bad})


def test_check_warns_about_a_hash_tag_in_key_prefix(settings):
    from django.core.checks import run_checks

    caches = {"default": {"BACKEND": BACKEND, "LOCATION": settings.CLUSTER_LOCATION, "KEY_PREFIX": "{shop}"}}
    from django.core.cache import caches as handler

    with override_settings(CACHES=caches):
        handler._settings = None
        ids = [message.id for message in run_checks(tags=["caches"])]
    assert "django_distcache.W002" in ids


@pytest.mark.parametrize(("policy", "warning"), [("allkeys-lru", "W003"), ("noeviction", "W004")])
def test_check_warns_about_eviction_policies_that_hurt_tags(cluster, settings, policy, warning):
    import redis
    from django.core.checks import run_checks

    nodes = [redis.Redis(port=port) for port in cluster.primary_ports]
    before = [node.config_get("maxmemory*") for node in nodes]
    try:
        for node in nodes:
            node.config_set("maxmemory", "512mb")  # without a limit Redis neither evicts nor refuses
            node.config_set("maxmemory-policy", policy)
        messages = {message.id: message.msg for message in run_checks(tags=["caches"])}
        assert f"django_distcache.{warning}" in messages
        if warning == "W003":  # tag keys have a TTL: allkeys-* adds the keys that have none
            assert "namespace key" in messages["django_distcache.W003"]
            assert "tag keys" not in messages["django_distcache.W003"]
        for node in nodes:
            node.config_set("maxmemory-policy", "volatile-lru")
        ids = [message.id for message in run_checks(tags=["caches"])]
        assert not {"django_distcache.W003", "django_distcache.W004"} & set(ids)
    finally:
        for node, old in zip(nodes, before, strict=True):
            node.config_set("maxmemory", old["maxmemory"])
            node.config_set("maxmemory-policy", old["maxmemory-policy"])
