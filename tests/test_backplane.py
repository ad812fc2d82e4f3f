"""The backplane (backplane.py) where the cache's Redis user may not use its channel. Its behaviour when
the channel works, drops and comes back: tests/test_tags.py and tests/test_versioning.py."""

from __future__ import annotations

import logging
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
