"""The backplane (backplane.py) where the cache's Redis user may not use its channel, and its deliberate
shutdown (stop_all). Its behaviour when the channel works, drops and comes back: tests/test_tags.py and
tests/test_versioning.py."""

from __future__ import annotations

import logging
import threading
import time

from tests.test_keys import acl_cache, acl_user, documented_acl_rules, wait_until

__all__ = ["acl_user"]  # a fixture, used by name


def _without_channels(key_prefix: str) -> list[str]:
    return [rule for rule in documented_acl_rules(key_prefix) if not rule.startswith("&")]


def test_a_refused_channel_is_logged_once_with_its_name_and_nothing_is_held_in_process(acl_user, caplog):
    caplog.set_level(logging.ERROR, logger="django_distcache.backplane")
    cache = acl_cache(acl_user, _without_channels)
    cache.set("k", "v", tags=["t"])
    assert cache.get("k") == "v"  # the cache works; its reads ask Redis for the tag versions every time

    def refusals() -> list[str]:
        return [m for m in caplog.messages if m.startswith("invalidation channel refused")]

    wait_until(lambda: refusals(), message="the refusal to be logged")
    time.sleep(1.0)  # two more attempts (RECONNECT_DELAYS), not logged again
    (message,) = refusals()
    assert "SSUBSCRIBE" in message and repr(cache.core.backplane.channel.decode()) in message
    assert "docs/security.md" in message
    assert not cache.core.backplane.connected
    assert cache.core.tags.held_count() == 0
    assert cache.get("k") == "v"


def test_stop_all_ends_every_channel_thread_and_a_later_read_subscribes_again(cache):
    from django_distcache.backplane import stop_all
    from tests.conftest import wait_for_backplane

    def channel_threads() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread.name == "distcache-backplane"]

    wait_for_backplane(cache)
    stop_all()
    assert (channel_threads(), cache.core.backplane.connected) == ([], False)
    wait_for_backplane(cache)  # used again: subscribed again


# A process with a live invalidation channel shuts it down deliberately, then its cluster goes away.
_SHUTS_DOWN = """
import sys, time, django
from django.conf import settings
settings.configure(SECRET_KEY="s", CACHES={"default": {
    "BACKEND": "django_distcache.cache.RedisClusterCache", "LOCATION": sys.argv[1], "KEY_PREFIX": "quiet"}})
django.setup()
from django.core.cache import cache
from django_distcache.backplane import stop_all
cache.core.backplane.ensure_started()
deadline = time.monotonic() + 60
while not cache.core.backplane.connected:
    assert time.monotonic() < deadline, "the channel did not come up"
    time.sleep(0.01)
stop_all()
print("stopped", flush=True)
sys.stdin.readline()  # the cluster is down now
time.sleep(1.0)  # a thread still listening would report the dropped channel at once
"""


def test_a_cluster_that_goes_after_a_deliberate_shutdown_is_not_reported_as_an_outage(tmp_path):
    """stop_all() runs at process exit, and a test session calls it before it stops its cluster: the
    cluster going away afterwards is no outage and logs nothing (it logged ~22 warnings after every
    green run of the suite)."""
    import subprocess
    import sys

    from django.conf import settings

    from django_distcache.devcluster import DevCluster
    from tests.conftest import ROOT

    dev = DevCluster(
        base_port=settings.CLUSTER_BASE_PORT + 60, primaries=1, replicas=0, data_dir=tmp_path / "c"
    )
    try:
        (location,) = dev.up(timeout=60)
        process = subprocess.Popen(
            [sys.executable, "-c", _SHUTS_DOWN, location],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline() == "stopped\n", process.communicate(timeout=60)
    finally:
        dev.down()
    out, err = process.communicate("\n", timeout=60)
    assert (process.returncode, err) == (0, "")
