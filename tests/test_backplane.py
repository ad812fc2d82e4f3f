"""The backplane (backplane.py) where the cache's Redis user may not use its channel, and its deliberate
shutdown. Its behaviour when the channel works, drops and comes back: tests/test_tags.py and
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


def test_a_deliberate_shutdown_stops_the_channel_quietly_before_its_cluster_goes(tmp_path, caplog):
    """stop_all() (at process exit, or before a test session stops its cluster) ends every subscriber
    thread, so the cluster going away afterwards is not reported as an outage; a later read subscribes
    again."""
    from django.conf import settings

    from django_distcache.backplane import stop_all
    from django_distcache.devcluster import DevCluster
    from tests.conftest import make_cache, wait_for_backplane

    def channel_threads() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread.name == "distcache-backplane"]

    dev = DevCluster(
        base_port=settings.CLUSTER_BASE_PORT + 60, primaries=1, replicas=0, data_dir=tmp_path / "c"
    )
    try:
        cache = make_cache(LOCATION=dev.up(timeout=60))
        wait_for_backplane(cache)
        stop_all()
        assert (channel_threads(), cache.core.backplane.connected) == ([], False)
        wait_for_backplane(cache)  # used again: subscribed again
        caplog.set_level(logging.INFO, logger="django_distcache")
        stop_all()
        assert channel_threads() == []
    finally:
        dev.down()
    # Nothing was left to see the cluster go (a thread still listening reports a dropped channel at once).
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
