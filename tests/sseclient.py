"""A real HTTP client for event streams in tests: treq over a real socket, bytes kept
as received, events parsed by the independent spec parser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool

from ssespec import Event, SpecParser

TIMEOUT = 15.0


def within(d: Deferred[Any], seconds: float = TIMEOUT) -> Deferred[Any]:
    """C{d}, failing with TimeoutError instead of hanging a test forever."""
    return d.addTimeout(seconds, reactor)


class Collector(Protocol):
    """Keeps everything a connection receives and fires waits as it arrives."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.closed: Deferred[None] = Deferred()
        self.is_closed = False
        self._waiters: list[tuple[Callable[[Any], bool], Deferred[Any]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self._check()

    def connectionLost(self, reason: Any = None) -> None:
        self.is_closed = True
        self.closed.callback(None)
        self._check()

    def _check(self) -> None:
        ready = [(p, d) for p, d in self._waiters if p(self)]
        self._waiters = [(p, d) for p, d in self._waiters if (p, d) not in ready]
        for _, d in ready:
            d.callback(self)

    def wait_for(self, predicate: Callable[[Any], bool], seconds: float = TIMEOUT
                 ) -> Deferred[Any]:
        """Fires with C{self} once C{predicate(self)} holds (checked as data arrives)."""
        d: Deferred[Any] = Deferred()
        self._waiters.append((predicate, d))
        self._check()
        return within(d, seconds)

    def wait_closed(self, seconds: float = TIMEOUT) -> Deferred[Any]:
        return self.wait_for(lambda c: c.is_closed, seconds)

    def close(self) -> None:
        """Hang up from the client side."""
        if not self.is_closed and self.transport is not None:
            self.transport.stopProducing()


class StreamReader(Collector):
    """Collects a response body: the raw bytes, and the events they parse into."""

    def __init__(self) -> None:
        super().__init__()
        self.parser = SpecParser()

    @property
    def events(self) -> list[Event]:
        return self.parser.events

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed(data)
        super().dataReceived(data)

    def wait_events(self, n: int, seconds: float = TIMEOUT) -> Deferred[StreamReader]:
        return self.wait_for(lambda r: len(r.events) >= n, seconds)


class Client:
    """An HTTP client whose connections are all closed at the end of the test."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.readers: list[StreamReader] = []

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return await within(self.http.request(method, self.base + path, **kwargs))

    async def text(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        response = await self.request(method, path, **kwargs)
        body = await within(treq.content(response))
        return response, body

    async def stream(self, path: str, headers: dict[str, str] | None = None
                     ) -> tuple[Any, StreamReader]:
        """Open an event stream; returns once the status and headers have arrived."""
        response = await self.request("GET", path, headers=headers, unbuffered=True)
        reader = StreamReader()
        self.readers.append(reader)
        response.deliverBody(reader)
        return response, reader

    async def close(self) -> None:
        for reader in self.readers:
            reader.close()
        await self.pool.closeCachedConnections()


class RawConnection(Collector):
    """A bare TCP connection: bytes out as given, bytes in as received."""

    @property
    def received(self) -> bytes:
        return bytes(self.raw)

    def wait_bytes(self, predicate: Callable[[bytes], bool], seconds: float = TIMEOUT
                   ) -> Deferred[bytes]:
        """Fires with everything received once C{predicate} holds or the peer closes."""
        d = self.wait_for(lambda c: c.is_closed or predicate(c.received), seconds)
        return d.addCallback(lambda c: c.received)


async def raw_connect(port: int) -> RawConnection:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    conn = RawConnection()
    await within(connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), conn))
    return conn


def split_response(data: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status line, headers in order, and the rest, of raw HTTP response bytes."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(h.split(": ", 1)) for h in lines[1:]]
    return lines[0], headers, rest  # type: ignore[return-value]


def slow_connect(port: int, rcvbuf: int = 4096) -> RawConnection:
    """A TCP connection whose reading is paused from the start: a client that does not
    read. Its small receive buffer makes the server's side back up sooner.
    C{transport.resumeProducing()} starts reading."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    conn = RawConnection()
    from twisted.internet.protocol import Factory

    protocol = reactor.adoptStreamConnection(  # type: ignore[attr-defined]
        sock.fileno(), socket.AF_INET, Factory.forProtocol(lambda: conn))
    del protocol
    sock.close()  # Twisted holds its own duplicate of the descriptor
    conn.transport.pauseProducing()
    return conn


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked HTTP/1.1 body (as much of it as is complete)."""
    out = bytearray()
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0 or len(rest) < size + 2:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)


def response_events(raw: bytes) -> SpecParser:
    """Parse the SSE events out of a raw HTTP response, chunked or not."""
    _, headers, body = split_response(raw)
    chunked = any(name.lower() == "transfer-encoding" and value.lower() == "chunked"
                  for name, value in headers)
    parser = SpecParser()
    parser.feed(dechunk(body) if chunked or not headers else body)
    return parser
