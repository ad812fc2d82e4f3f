"""A pub/sub subscription of the topology (topology/subscription.py), against the real cluster: what the
backplane's listening thread relies on. The backplane's behaviour as a user sees it: tests/test_tags.py."""

from __future__ import annotations

import time
import uuid

import pytest

from django_distcache.conf import ConnectionSettings, NodeAddress
from django_distcache.topology import Call, ClusterTopology, Message
from django_distcache.topology.base import TopologyState
from tests.conftest import hung_primary


def _topology(cluster) -> ClusterTopology:
    return ClusterTopology(
        TopologyState(ConnectionSettings(startup_nodes=(NodeAddress("127.0.0.1", cluster.ports[0]),)))
    )


def _next_message(subscription, within: float = 5.0) -> Message:
    deadline = time.monotonic() + within
    while True:
        message = subscription.get_message(timeout=0.05)
        if message is not None:
            return message
        assert time.monotonic() < deadline, "no message came"


def test_a_subscription_is_confirmed_then_delivers_what_is_published(cluster):
    topology = _topology(cluster)
    channel = f"sub-{uuid.uuid4().hex[:8]}:~{{invalidations}}".encode()
    subscription = topology.subscribe([channel])
    try:
        assert _next_message(subscription) == Message("subscribed", channel)
        assert topology.sharded_pubsub is True  # the suite's servers have SSUBSCRIBE (Redis >= 7.0)
        topology.execute(Call(channel, ("SPUBLISH", channel, b"hello")))
        assert _next_message(subscription) == Message("message", channel, b"hello")
        other = channel.replace(b"sub-", b"other-")  # the same hash tag: the same slot, the same connection
        subscription.subscribe([other])
        assert _next_message(subscription) == Message("subscribed", other)
        topology.execute(Call(other, ("SPUBLISH", other, b"too")))
        assert _next_message(subscription) == Message("message", other, b"too")
    finally:
        subscription.close()
        topology.close()


def test_a_hung_node_under_a_subscription_is_noticed_by_its_unanswered_ping(cluster):
    """A node that stops answering (no FIN, no RST) would leave the subscription silent forever; after
    `ping_every` seconds of silence a PING goes out, and no answer within as long again is a drop."""
    topology = _topology(cluster)
    channel = f"hung-{uuid.uuid4().hex[:8]}:~{{invalidations}}".encode()
    subscription = topology.subscribe([channel], ping_every=0.3)
    try:
        assert _next_message(subscription) == Message("subscribed", channel)
        assert _next_message_or_none(subscription, 0.6) is None  # a live node answers the PING: no drop
        with hung_primary(cluster, subscription.node.port):
            started = time.monotonic()
            with pytest.raises(ConnectionError, match="half-open"):
                while time.monotonic() - started < 5:
                    subscription.get_message(timeout=0.05)
            assert time.monotonic() - started < 1.5
    finally:
        subscription.close()
        topology.close()


def _next_message_or_none(subscription, within: float) -> Message | None:
    """What comes within `within` seconds (raising as the subscription raises), or None."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        message = subscription.get_message(timeout=0.05)
        if message is not None:
            return message
    return None
