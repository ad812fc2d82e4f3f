"""Failover repair, the pure logic (no server): which keys a process deletes rather than let an older copy
be served, after a dropped write, a node that comes back, or a failover. The same paths against the real
cluster: tests/test_replicas.py."""

from __future__ import annotations

import logging

import pytest
from redis.crc import key_slot

from django_distcache.conf import ConnectionSettings, NodeAddress
from django_distcache.topology import base, repair
from django_distcache.topology.base import Call, SlotMap, TopologyState

A, B, C = NodeAddress("127.0.0.1", 1), NodeAddress("127.0.0.1", 2), NodeAddress("127.0.0.1", 3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(base.time, "monotonic", clock)
    return clock


def _state(window: float = 1.0, fallback: bool = False) -> TopologyState:
    settings = ConnectionSettings(
        startup_nodes=(A,), repair_window=window, replica_fallback=fallback, breaker_threshold=1
    )
    state = TopologyState(settings)
    state.install(SlotMap([(0, 8191, A, [C]), (8192, 16383, B, [])]))
    return state


def _key_on(node: NodeAddress, state: TopologyState, name: str) -> bytes:
    """A key named after `name` whose slot `node` serves."""
    for n in range(10_000):
        key = f"{name}-{n}".encode()
        if state.slot_map.primaries[key_slot(key)] == node:
            return key
    raise AssertionError("no key found")


def _write(key: bytes, **extra) -> Call:
    return Call(key, ("SET", key, b"v"), repairable=True, **extra)


def test_a_failure_holds_the_writes_of_the_window_before_it_and_the_dropped_ones(clock):
    state = _state(window=1.0, fallback=True)
    old, recent, dropped = (_key_on(A, state, name) for name in ("old", "recent", "dropped"))
    state.repair.acked(A, [_write(old)])
    clock.now += 2.0  # `old` is replicated by now, as far as this process trusts
    state.repair.acked(A, [_write(recent)])
    clock.now += 0.5
    state.breakers(A).failure(ConnectionError("refused"))  # threshold 1: opens, A failed
    state.repair.note_unsynced(_write(dropped), A)
    assert state.repair.unsynced[A] == {recent, dropped}
    # Fallback reads of the held keys miss; the older one may still be read from the replica.
    assert state.fallback_replica(Call(recent, ("GET", recent), read=True), A) is None
    assert state.fallback_replica(Call(dropped, ("GET", dropped), read=True), A) is None
    assert state.fallback_replica(Call(old, ("GET", old), read=True), A) == C
    assert not state.repair.pending


def test_the_node_coming_back_queues_its_held_keys_and_a_delete_of_the_key_repairs_it(clock):
    state = _state()
    recent, dropped = _key_on(A, state, "recent"), _key_on(A, state, "dropped")
    state.repair.acked(A, [_write(recent)])
    state.breakers(A).failure(ConnectionError("refused"))
    state.repair.note_unsynced(_write(dropped), A)
    state.breakers(A).success()  # closes: A answers again, still holding what it held
    assert A not in state.repair.unsynced
    assert state.repair.pending == {recent, dropped} and state.repair.wanted
    assert state.repair.due(Call(dropped, ("GET", dropped), read=True), A)
    assert not state.repair.due(Call(dropped, ("DEL", dropped), repairable=True), A)  # deletes it itself
    state.repair.acked(A, [Call(dropped, ("DEL", dropped), repairable=True)])
    assert state.repair.pending == {recent} and state.repair.repaired == 1


def test_the_call_that_probes_a_node_coming_back_deletes_a_held_key_before_reading_it(clock):
    state = _state()
    dropped = _key_on(A, state, "dropped")
    state.breakers(A).failure(ConnectionError("refused"))
    state.repair.note_unsynced(_write(dropped), A)
    read = Call(dropped, ("GET", dropped), read=True)
    assert not state.repair.pending and state.repair.due(read, A)
    assert not state.repair.due(read, B)
    state.repair.done(dropped, A)  # the probe's DEL went through: nothing left to hold
    assert not state.repair.due(read, A)


def test_a_map_without_the_node_queues_its_recent_writes_even_if_this_process_saw_no_failure(clock):
    state = _state()
    on_a, on_b = _key_on(A, state, "a"), _key_on(B, state, "b")
    state.repair.acked(A, [_write(on_a)])
    state.repair.acked(B, [_write(on_b)])
    clock.now += 30  # idle for long: the window counts back from A's newest write, not from now
    state.install(SlotMap([(0, 8191, C, [A]), (8192, 16383, B, [])]))  # C took over from A
    assert state.repair.pending == {on_a}
    assert A not in state.repair.recent and B in state.repair.recent
    state.install(SlotMap([(0, 8191, C, [A]), (8192, 16383, B, [])]))  # nothing new: nothing queued
    assert state.repair.pending == {on_a}


def test_moved_to_a_replica_queues_only_the_keys_of_the_slot_that_left(clock):
    state = _state()
    first, second = _key_on(A, state, "first"), _key_on(A, state, "second")
    assert key_slot(first) != key_slot(second)
    state.repair.acked(A, [_write(first)])
    state.repair.acked(A, [_write(second)])
    state.repair.slot_left(A, key_slot(second), B)  # to another primary: a reshard, the values moved along
    assert not state.repair.pending
    state.repair.slot_left(A, key_slot(first), C)  # to A's replica: a failover
    assert state.repair.pending == {first}
    state.repair.slot_left(B, key_slot(second), C)  # B holds nothing: no work, nothing queued
    assert state.repair.pending == {first}


def test_a_write_dropped_while_the_node_is_up_is_repaired_at_once_and_others_are_ignored(clock):
    state = _state()
    key = _key_on(A, state, "k")
    state.repair.note_unsynced(Call(key, ("XADD", key, "*", "c", "1")), A)  # not repairable: a stream
    state.repair.note_unsynced(Call(key, ("GET", key), read=True), A)
    assert not state.repair.pending and not state.repair.unsynced
    state.repair.note_unsynced(_write(key), A)  # a lost reply; A's breaker is closed
    assert state.repair.pending == {key} and not state.repair.unsynced


def test_a_window_of_zero_keeps_no_acknowledged_writes(clock):
    state = _state(window=0)
    key = _key_on(A, state, "k")
    state.repair.acked(A, [_write(key)])
    state.breakers(A).failure(ConnectionError("refused"))
    assert not state.repair.recent and A not in state.repair.unsynced
    state.repair.note_unsynced(_write(key), A)  # a dropped write is still held and repaired
    state.breakers(A).success()
    assert state.repair.pending == {key}


def test_too_many_writes_to_name_are_logged_not_guessed(clock, monkeypatch, caplog):
    monkeypatch.setattr(repair, "MAX_UNSYNCED_KEYS", 5)
    state = _state(window=1.0, fallback=True)
    keys = [_key_on(A, state, f"k{n}") for n in range(8)]
    for key in keys:
        state.repair.acked(A, [_write(key)])
    assert len(state.repair.recent[A]) == 5
    state.breakers(A).failure(ConnectionError("refused"))
    assert state.repair.unsynced[A] is None
    assert state.fallback_replica(Call(keys[0], ("GET", keys[0]), read=True), A) is None  # all miss
    caplog.set_level(logging.WARNING, logger="django_distcache.topology")
    state.breakers(A).success()
    assert state.repair.untracked == 1 and not state.repair.pending
    assert any("more than 5 recent or dropped writes" in message for message in caplog.messages)


def test_a_burst_too_large_to_keep_stops_mattering_once_it_is_out_of_the_window(clock, monkeypatch):
    monkeypatch.setattr(repair, "MAX_UNSYNCED_KEYS", 5)
    state = _state(window=1.0)
    for n in range(8):
        state.repair.acked(A, [_write(_key_on(A, state, f"burst{n}"))])
    clock.now += 5
    later = _key_on(A, state, "later")
    state.repair.acked(A, [_write(later)])
    state.breakers(A).failure(ConnectionError("refused"))
    assert state.repair.unsynced[A] == {later}


def test_a_write_refused_with_clusterdown_is_repaired_and_a_bug_is_not(clock):
    from redis.exceptions import ClusterDownError, ResponseError

    from django_distcache.topology.cluster import ClusterTopology

    state = _state()
    topology = ClusterTopology(state)
    refused, wrong = _key_on(A, state, "refused"), _key_on(A, state, "wrong")
    with pytest.raises(ClusterDownError):
        topology.failed(_write(refused), A, state.breakers(A), ClusterDownError("The cluster is down"), 1)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        topology.failed(_write(wrong), A, state.breakers(A), ResponseError("WRONGTYPE"), 1)
    assert state.repair.pending == {refused}
