"""A small HTTP/1.1 load generator: N concurrent connections, keep-alive when the server allows it.

The machine has no wrk; this does what `wrk -c16` did in issue 12, from Python's asyncio: each connection
sends a GET, reads the whole response (Content-Length or chunked), and sends the next one on the same
connection unless the server said `Connection: close` (gunicorn's default sync worker does), in which
case it connects again. Counted: responses per status, and connections opened.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    connections: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool] | None:
    """(status, whether the server closes the connection); None if it closed before a response."""
    status_line = await reader.readline()
    if not status_line:
        return None
    status = int(status_line.split()[1])
    length, chunked, close = 0, False, status_line.startswith(b"HTTP/1.0")
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection":
            close = value == "close"
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, close


async def _connection(host: str, port: int, path: str, until: float, result: LoadResult) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n\r\n".encode()
    writer = None
    try:
        while time.perf_counter() < until:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
                result.connections += 1
            writer.write(request)
            try:
                response = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                result.errors.append(f"{type(error).__name__}: {error}")
                response = None
            if response is None:
                writer.close()
                writer = None
                continue
            status, close = response
            result.statuses[status] += 1
            if close:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


async def _load(host: str, port: int, path: str, connections: int, seconds: float) -> LoadResult:
    result = LoadResult(seconds=0.0)
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(_connection(host, port, path, until, result) for _ in range(connections)))
    result.seconds = time.perf_counter() - started
    return result


def load(host: str, port: int, path: str, connections: int = 16, seconds: float = 3.0) -> LoadResult:
    """GET `path` over `connections` concurrent connections for `seconds`; every response is read whole."""
    return asyncio.run(_load(host, port, path, connections, seconds))
