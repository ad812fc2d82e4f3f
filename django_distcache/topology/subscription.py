"""A pub/sub subscription on a connection of its own: what the backplane listens to (backplane.py says why).

Sharded pub/sub (SSUBSCRIBE, Redis >= 7.0) where the server has it, classic SUBSCRIBE otherwise. A silent
connection is probed with PING, so a half-open one (the node gone without a FIN) is noticed within two
probe intervals instead of never.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from redis.exceptions import NoPermissionError, ResponseError

from ..conf import NodeAddress
from .base import refused


class PubSubConnection(Protocol):
    """What a subscription needs of a redis-py connection."""

    def send_command(self, *args: Any, **kwargs: Any) -> None: ...
    def read_response(self, *args: Any, **kwargs: Any) -> Any: ...
    def can_read(self, timeout: float = 0) -> bool: ...
    def disconnect(self, *args: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class Message:
    """`subscribed`: the server confirmed `channel`; `message`: `payload` was published on it."""

    kind: Literal["subscribed", "message"]
    channel: bytes
    payload: bytes = b""


class Subscription:
    """Channels of one slot, subscribed on one connection to `node`; one thread reads it."""

    def __init__(self, connection: PubSubConnection, node: NodeAddress, ping_every: float = 1.0) -> None:
        self.node = node
        self.ping_every = ping_every
        # SSUBSCRIBE (Redis >= 7.0), or classic pub/sub; None until the first subscription finds out.
        self.sharded: bool | None = None
        self._connection = connection
        self._pending: deque[Message] = deque()
        self._silent_since = time.monotonic()
        self._ping_sent_at: float | None = None

    def start(self, channels: list[bytes], sharded: bool | None) -> None:
        """The first subscription, its confirmation read here: a server without sharded pub/sub (before
        Redis 7.0) answers SSUBSCRIBE with an error, and classic pub/sub is used from then on. `sharded`:
        what an earlier subscription found out, if any."""
        self.sharded = sharded
        try:
            self.subscribe(channels)
            try:
                reply = self._connection.read_response(push_request=True)
            except ResponseError as error:
                if self.sharded is not None or "unknown command" not in str(error).lower():
                    raise
                self.sharded = False
                self.subscribe(channels)
                reply = self._connection.read_response(push_request=True)
        except NoPermissionError as error:
            raise refused(error, (self._command(), *channels), channels[0])  # noqa: B904 - the reply is its cause
        if self.sharded is None:
            self.sharded = True
        message = self._message(reply)
        if message is None or message.kind != "subscribed":
            raise ResponseError(f"unexpected reply to a subscription: {reply!r}")
        self._pending.append(message)
        self._silent_since = time.monotonic()

    def subscribe(self, channels: list[bytes]) -> None:
        """Ask for `channels` too; their confirmations come as messages."""
        self._connection.send_command(self._command(), *channels)

    def get_message(self, timeout: float) -> Message | None:
        """The next message, or None if none came within `timeout` seconds. Raises ConnectionError when the
        connection is half-open or the server ended the subscription (its slot moved)."""
        if self._pending:
            return self._pending.popleft()
        connection = self._connection
        if connection.can_read(timeout=timeout):
            try:
                reply = connection.read_response(push_request=True)
            except NoPermissionError as error:
                raise refused(error, (self._command(),))  # noqa: B904 - the reply is its cause
            self._silent_since, self._ping_sent_at = time.monotonic(), None  # anything heard proves it alive
            return self._message(reply)
        now = time.monotonic()
        if self._ping_sent_at is not None:
            if now - self._ping_sent_at >= self.ping_every:
                raise ConnectionError("no answer to PING: the connection is half-open")
        elif now - self._silent_since >= self.ping_every:
            connection.send_command("PING")
            self._ping_sent_at = now
        return None

    def close(self) -> None:
        self._connection.disconnect()

    def _command(self) -> str:
        return "SSUBSCRIBE" if self.sharded is not False else "SUBSCRIBE"

    @staticmethod
    def _message(reply: Any) -> Message | None:
        if not isinstance(reply, list) or len(reply) < 2:
            return None
        kind = reply[0].lower() if isinstance(reply[0], bytes) else reply[0]
        if kind in (b"message", b"smessage") and len(reply) >= 3:
            return Message("message", reply[1], reply[2])
        if kind in (b"ssubscribe", b"subscribe"):
            return Message("subscribed", reply[1])
        if kind in (b"sunsubscribe", b"unsubscribe"):
            # The server moved the channel's slot (resharding, failover): subscribe again where it lives.
            raise ConnectionError("unsubscribed by the server")
        return None  # a PING's answer
