"""The daemon driven in memory: its sites, hub and router with a MemoryReactorClock for
reactor and clock, clients on iosim's fake transports. No Redis, no sockets, no
processes: the fast tier for routes, streams, limits, forced refresh and drain."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from emojistream.config import resolve
from emojistream.service import Emojistream
from sseclient import dechunk, response_events, split_response


class MemoryClient(Protocol):
    """One client connection: what it sent, what it received, whether it is closed."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False
        self.pump: iosim.IOPump | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.flush()

    def get(self, path: str, method: str = "GET", headers: str = "") -> None:
        self.send(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())

    def flush(self) -> None:
        assert self.pump is not None
        self.pump.flush()

    def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()
        self.flush()

    @property
    def head(self) -> tuple[str, dict[str, str]]:
        status, headers, _ = split_response(bytes(self.received))
        return status, {name.lower(): value for name, value in headers}

    @property
    def body(self) -> bytes:
        """The response body received so far, de-chunked if it is chunked."""
        _, headers, body = split_response(bytes(self.received))
        chunked = any(n.lower() == "transfer-encoding" and v.lower() == "chunked"
                      for n, v in headers)
        return dechunk(body) if chunked else body

    def events(self) -> list[Any]:
        return response_events(bytes(self.received)).events


class MemoryDaemon:
    """An Emojistream whose time is a MemoryReactorClock, never started: routes and
    streams work as built; Redis messages are handed to its router directly."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.reactor = MemoryReactorClock()
        settings = resolve({"REDIS_URL": "redis://127.0.0.1:1", **(env or {})},
                           {"listen": "tcp:0"})
        self.app = Emojistream(settings, self.reactor)
        self.clients: list[MemoryClient] = []

    def connect(self, peer: str = "127.0.0.1", site: int = 0) -> MemoryClient:
        """A new client connection from C{peer}; it is closed at once if the site's
        gate refuses it."""
        client = MemoryClient()
        address = IPv4Address("TCP", peer, 40000 + len(self.clients))
        server = self.app.sites[site].buildProtocol(address)
        client_transport = iosim.FakeTransport(client, isServer=False)
        if server is None:
            client.makeConnection(client_transport)
            client.connectionLost(None)
            return client
        server_transport = iosim.FakeTransport(server, isServer=True, peerAddress=address)
        client.pump = iosim.connect(server, server_transport, client, client_transport,
                                    greet=False)
        self.clients.append(client)
        return client

    def flush(self) -> None:
        for client in self.clients:
            if client.pump is not None:
                client.pump.flush()

    def publish(self, channel: bytes, payload: bytes) -> None:
        """A message as one read from Redis brings it."""
        router = self.app.router
        router.read_started()
        router.message(channel, payload)
        router.read_done()
        self.flush()

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.flush()
