"""Asyncio connections shared by every coroutine of one event loop: one socket per node, many callers.

A coroutine that sends a command does not take a connection of its own. It appends its packed command to
the node's `Multiplexed` connection and awaits a future; what every coroutine of one loop iteration sent
leaves in one write, and the replies, which Redis sends in the order it read the commands, are matched to
the futures in that order as they arrive (automatic pipelining). A burst of 200 `aget`s to three primaries
costs three connections and a few round trips, not 200 connections and 200 round trips.

Failure detection follows the node, not the loop:
- The connection is opened once (one TCP connect, AUTH/READONLY in the same write) by a task every waiting
  caller shares; a burst never opens connections by the hundred, so a busy client machine does not time
  its own connects out and open a healthy node's breaker.
- SOCKET_TIMEOUT bounds how long the node may stay silent while replies are owed: one timer per connection
  checks the oldest unanswered command and the last bytes received. asyncio handles ready sockets before
  due timers in each loop iteration, so a reply that arrived while the loop was busy elsewhere is read
  before the timer can call the node hung.
- A timeout, a dropped connection or a reply that cannot be parsed fails every caller still owed a reply
  (each with an error of its own) and retires the connection; the next caller opens a new one.

A caller cancelled while it waits leaves the connection as it is: its reply is read and dropped when it
arrives, in its place in the order, so nothing is ever handed to the wrong caller.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..conf import ConnectionSettings, NodeAddress
from .base import connection_kwargs

Command = tuple[Any, ...]

_NOT_ENOUGH = object()


def _error_reply(message: str) -> Exception:
    """The exception object for an error reply (MOVED, ASK, WRONGTYPE, ...), as redis-py's parsers map it."""
    error: Exception = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


def pack(commands: list[Command]) -> bytes:
    """`commands` in RESP, ready for one write."""
    packed: bytes = (
        hiredis.pack_command(commands[0])
        if len(commands) == 1
        else b"".join([hiredis.pack_command(command) for command in commands])
    )
    return packed


def fresh(error: BaseException) -> BaseException:
    """A new exception like `error`, for one of several callers failing for the same cause (an exception
    object raised in many tasks would collect all of their tracebacks). It names that cause as its
    `shared_failure`: a node's breaker counts one failure per cause (steps.py), not one per caller that
    was waiting on the connection when it failed."""
    origin = getattr(error, "shared_failure", error)
    try:
        copy = type(error)(*error.args)
    except Exception:  # an exception class with another signature
        copy = RedisConnectionError(str(error))
    copy.__cause__ = error.__cause__
    copy.shared_failure = origin  # type: ignore[attr-defined]
    return copy


class _Owed:
    """The replies one submission is still owed: `count` of them, collected in `replies`."""

    __slots__ = ("future", "count", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[Any], count: int, sent_at: float) -> None:
        self.future = future
        self.count = count
        self.replies: list[Any] | None = None if count == 1 else []
        self.sent_at = sent_at


class Multiplexed(asyncio.Protocol):
    """One connection to one node, shared by the coroutines of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, node: NodeAddress, timeout: float | None) -> None:
        self.loop = loop
        self.node = node
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=_error_reply, notEnoughData=_NOT_ENOUGH)
        self.owed: collections.deque[_Owed] = collections.deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.failure: BaseException | None = None  # set once the connection is retired
        self.last_read = 0.0
        self.watchdog: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return self.failure is None

    # -- sending --------------------------------------------------------------------------------------------
    def submit(self, data: bytes, count: int) -> asyncio.Future[Any]:
        """Send `data` (`count` packed commands); the future gets the reply (`count` == 1) or the list of
        replies, error replies as exception objects, or the connection's failure."""
        if self.failure is not None:
            raise fresh(self.failure)
        loop = self.loop
        future = loop.create_future()
        now = loop.time()
        if not self.owed:
            self.last_read = now  # the silence that counts starts now
            if self.watchdog is None and self.timeout is not None:
                self.watchdog = loop.call_at(now + self.timeout, self._check_silence)
        self.owed.append(_Owed(future, count, now))
        if self.flush_scheduled:
            self.out.append(data)
        else:
            # The first command of a loop iteration goes out at once (no latency for a lone caller); those
            # sent after it in the same iteration leave together when the loop comes round.
            assert self.transport is not None
            self.transport.write(data)
            self.flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.transport is not None and self.failure is None:
            out, self.out = self.out, []
            self.transport.write(b"".join(out))

    # -- receiving ------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        reader = self.reader
        owed = self.owed
        try:
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is _NOT_ENOUGH:
                    return
                if not owed:
                    raise RedisConnectionError(f"unexpected reply from {self.node}")
                head = owed[0]
                if head.replies is None:
                    owed.popleft()
                    if not head.future.done():
                        head.future.set_result(reply)
                    continue
                head.replies.append(reply)
                if len(head.replies) == head.count:
                    owed.popleft()
                    if not head.future.done():
                        head.future.set_result(head.replies)
        except Exception as error:  # a protocol error: nothing after it can be matched any more
            self.retire(RedisConnectionError(f"unreadable reply from {self.node}: {error}"))

    def _check_silence(self) -> None:
        self.watchdog = None
        if not self.owed or self.failure is not None or self.timeout is None:
            return
        quiet_since = max(self.owed[0].sent_at, self.last_read)
        due = quiet_since + self.timeout
        if self.loop.time() >= due:
            self.retire(RedisTimeoutError(f"Timeout reading from {self.node}"))
        else:
            self.watchdog = self.loop.call_at(due, self._check_silence)

    # -- the end of a connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:  # pragma: no cover - a socket type without keepalive
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.retire(RedisConnectionError(f"Connection to {self.node} closed{reason}"))

    def eof_received(self) -> bool:
        self.retire(RedisConnectionError(f"Connection closed by {self.node}"))
        return False

    def retire(self, failure: BaseException) -> None:
        """Stop using this connection: every caller still owed a reply fails with `failure`."""
        if self.failure is None:
            self.failure = failure
            if self.watchdog is not None:
                self.watchdog.cancel()
                self.watchdog = None
            if self.transport is not None:
                self.transport.abort()
        owed, self.owed = self.owed, collections.deque()
        for waiting in owed:
            if not waiting.future.done():
                waiting.future.set_exception(fresh(failure))
        self.out = []

    def close(self) -> None:
        self.retire(RedisConnectionError(f"Connection to {self.node} closed by this process"))


async def open_multiplexed(settings: ConnectionSettings, node: NodeAddress, readonly: bool) -> Multiplexed:
    """A connected, authenticated connection to `node` (READONLY first for a replica serving reads)."""
    loop = asyncio.get_running_loop()
    ssl_context = _ssl_context(settings, node) if settings.ssl else None
    connecting = loop.create_task(
        loop.create_connection(
            lambda: Multiplexed(loop, node, settings.socket_timeout), node.host, node.port, ssl=ssl_context
        )
    )
    try:
        try:
            await _within(connecting, settings.socket_connect_timeout)
        except asyncio.CancelledError:
            connecting.cancel()  # the caller gave up: so does the open
            raise
        _, protocol = connecting.result()
    except TimeoutError as error:
        raise RedisTimeoutError(f"Timeout connecting to {node}") from error
    except OSError as error:
        raise RedisConnectionError(f"Error connecting to {node}: {error}") from error
    handshake: list[Command] = []
    if settings.password is not None:
        if settings.username:
            handshake.append(("AUTH", settings.username, settings.password))
        else:
            handshake.append(("AUTH", settings.password))
    if readonly:
        handshake.append(("READONLY",))
    if handshake:
        try:
            replies = await protocol.submit(pack(handshake), len(handshake))
        except BaseException:
            protocol.close()
            raise
        for reply in replies:
            if isinstance(reply, Exception):
                protocol.close()
                raise reply
    return protocol


# Loop iterations a connect past its timeout still gets before it is called failed (see _within).
GRACE_ITERATIONS = 8


async def _within(task: asyncio.Task[Any], timeout: float | None) -> None:
    """Wait for `task` for `timeout` seconds; raise TimeoutError (the task cancelled) if it is not done.

    Opening a connection takes several turns of the loop after the kernel has connected the socket (the
    connect's callback, the transport, `connection_made`). On a busy machine the process may not run at all
    for longer than the timeout, and then the timeout and the finished connect are noticed in the same turn;
    were the timeout to win, a node that answered in time would be charged with a failure. So when the time
    is up, the loop first runs a few more turns, which poll the sockets without waiting: a connect the
    kernel has finished completes in them, one that the node never answered does not.
    """
    if timeout is None:
        await asyncio.wait({task})
        return
    await asyncio.wait({task}, timeout=timeout)
    for _ in range(GRACE_ITERATIONS):
        if task.done():
            return
        await asyncio.sleep(0)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise TimeoutError


def _ssl_context(settings: ConnectionSettings, node: NodeAddress) -> Any:
    """The TLS context redis-py would build from the same `ssl_*` arguments."""
    from redis.asyncio.connection import SSLConnection

    return SSLConnection(**connection_kwargs(settings, node)).ssl_context.get()


def _retrieve(task: asyncio.Task[Multiplexed]) -> None:
    if not task.cancelled():
        task.exception()


class NodeLink:
    """The shared connection to one node for one event loop: opened on first use by one task that every
    caller arriving meanwhile waits for, and opened again after it is retired."""

    __slots__ = ("settings", "node", "readonly", "connection", "opening")

    def __init__(self, settings: ConnectionSettings, node: NodeAddress, readonly: bool) -> None:
        self.settings = settings
        self.node = node
        self.readonly = readonly
        self.connection: Multiplexed | None = None
        self.opening: asyncio.Task[Multiplexed] | None = None

    async def connect(self) -> Multiplexed:
        """The usable connection, opened (or awaited, if another caller is opening it) when there is none."""
        connection = self.connection
        if connection is not None and connection.failure is None:
            return connection
        opening = self.opening
        if opening is None:
            opening = self.opening = asyncio.get_running_loop().create_task(self._open())
            # Retrieved here, so that an open every waiter gave up on is not reported as never retrieved.
            opening.add_done_callback(_retrieve)
        try:
            # Shielded: a caller cancelled while waiting does not cancel the open the others wait for.
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            raise fresh(error) from error.__cause__

    async def _open(self) -> Multiplexed:
        try:
            connection = await open_multiplexed(self.settings, self.node, self.readonly)
        finally:
            self.opening = None
        self.connection = connection
        return connection

    def close(self) -> None:
        if self.opening is not None:
            self.opening.cancel()
            self.opening = None
        if self.connection is not None:
            self.connection.close()
            self.connection = None


__all__ = ["Multiplexed", "NodeLink", "fresh", "open_multiplexed", "pack"]
