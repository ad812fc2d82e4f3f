"""The multiplexed async connection's own logic (topology/multiplex.py), on a transport that records what
is written: replies matched to callers in order, and what a failure does to the callers still waiting.
(The cluster tests in test_cache_async.py run the same connections against real nodes.)"""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from django_distcache.conf import NodeAddress
from django_distcache.topology.multiplex import Multiplexed, pack


class _Transport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data):
        self.written.append(bytes(data))

    def abort(self):
        self.aborted = True

    def get_extra_info(self, name, default=None):
        return default


def _connection(timeout=None) -> tuple[Multiplexed, _Transport]:
    connection = Multiplexed(asyncio.get_running_loop(), NodeAddress("127.0.0.1", 1), timeout)
    transport = _Transport()
    connection.connection_made(transport)
    return connection, transport


async def test_replies_are_matched_in_order_and_a_cancelled_caller_keeps_its_place():
    connection, transport = _connection()
    first = connection.submit(pack([("GET", "a")]), 1)
    second = connection.submit(pack([("ASKING",), ("GET", "b")]), 2)
    third = connection.submit(pack([("GET", "c")]), 1)
    fourth = connection.submit(pack([("GET", "d")]), 1)
    # The first command leaves at once, the others of the same loop iteration together after it.
    assert transport.written == [pack([("GET", "a")])]
    await asyncio.sleep(0)
    assert transport.written[1] == pack([("ASKING",), ("GET", "b"), ("GET", "c"), ("GET", "d")])
    third.cancel()
    connection.data_received(b"$1\r\nA\r\n+OK\r\n$1\r\nB\r\n$1\r\nC")  # a reply cut mid-way
    assert first.result() == b"A"
    assert second.result() == [b"OK", b"B"]
    assert not fourth.done()
    connection.data_received(b"\r\n-WRONGTYPE Operation against a key holding the wrong kind\r\n")
    assert third.cancelled()  # its reply (C) was read and dropped
    assert isinstance(fourth.result(), ResponseError)  # an error reply is the caller's, as an object
    assert connection.usable and not connection.owed


async def test_a_dropped_connection_fails_every_waiting_caller_with_an_error_of_its_own():
    connection, _ = _connection()
    waiting = [connection.submit(pack([("GET", str(i))]), 1) for i in range(3)]
    connection.connection_lost(ConnectionResetError("reset"))
    errors = [future.exception() for future in waiting]
    assert all(isinstance(error, RedisConnectionError) for error in errors)
    assert len({id(error) for error in errors}) == 3
    assert len({id(error.shared_failure) for error in errors}) == 1  # one cause: one breaker failure
    with pytest.raises(RedisConnectionError):
        connection.submit(pack([("GET", "late")]), 1)


async def test_an_unparseable_reply_retires_the_connection():
    connection, transport = _connection()
    waiting = connection.submit(pack([("GET", "a")]), 1)
    connection.data_received(b"?not resp\r\n")
    assert isinstance(waiting.exception(), RedisConnectionError)
    assert transport.aborted and not connection.usable


async def test_a_node_silent_past_the_timeout_is_judged_hung_but_one_that_streams_is_not():
    connection, transport = _connection(timeout=5.0)
    batch = connection.submit(pack([("GET", str(i)) for i in range(3)]), 3)
    now = connection.loop.time()
    # Sent long ago, but bytes of its replies came in just now: the node is answering, however long the
    # batch takes (the watchdog is called by hand so that no clock of a busy machine is involved).
    connection.owed[0].sent_at = now - 60
    connection.data_received(b"$1\r\nx\r\n")
    connection._check_silence()
    assert connection.usable
    connection.data_received(b"$1\r\nx\r\n$1\r\nx\r\n")
    assert batch.result() == [b"x"] * 3
    silent = connection.submit(pack([("GET", "a")]), 1)
    connection.owed[0].sent_at = connection.last_read = now - 60  # nothing heard for a minute
    connection._check_silence()
    assert isinstance(silent.exception(), RedisTimeoutError)
    assert transport.aborted and not connection.usable


async def test_the_watchdog_fires_on_its_own_when_a_node_says_nothing():
    connection, transport = _connection(timeout=0.05)
    silent = connection.submit(pack([("GET", "a")]), 1)
    with pytest.raises(RedisTimeoutError):
        await asyncio.wait_for(silent, 30)
    assert transport.aborted
