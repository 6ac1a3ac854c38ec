"""A TCP proxy on a real loopback port that a test can wedge: it forwards, or it
holds every connection open and passes nothing either way (a stuck peer: a wedged
proxy, a dead NAT entry), accepting new connections and never answering them."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol


class _Upstream(Protocol):
    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def dataReceived(self, data: bytes) -> None:
        if self.downstream.proxy.forwarding:
            self.downstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.transport.loseConnection()


class _Downstream(Protocol):
    def __init__(self, proxy: StuckableProxy) -> None:
        self.proxy = proxy
        self.upstream: _Upstream | None = None
        self.held: list[bytes] = []

    def connectionMade(self) -> None:
        self.proxy.connections.add(self)
        # A connection made while wedged is accepted and never answered.
        if self.proxy.forwarding:
            self._connect_upstream()

    def _connect_upstream(self) -> None:
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.target_port)

        def connected(upstream: _Upstream) -> None:
            self.upstream = upstream
            self.transport.resumeProducing()
            for data in self.held:
                upstream.transport.write(data)
            self.held = []

        endpoint.connect(Factory.forProtocol(lambda: _Upstream(self))).addCallbacks(
            connected, lambda _: self.transport.loseConnection())

    def dataReceived(self, data: bytes) -> None:
        if not self.proxy.forwarding:
            return
        if self.upstream is None:
            self.held.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.proxy.connections.discard(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class StuckableProxy:
    """Listens on a free loopback port and forwards to C{target_port}."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.forwarding = True
        self.connections: set[_Downstream] = set()
        self.port: Any = None

    async def start(self) -> int:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(Factory.forProtocol(lambda: _Downstream(self)))
        return int(self.port.getHost().port)

    def wedge(self) -> None:
        """From now on pass nothing, on open connections and new ones alike."""
        self.forwarding = False

    def recover(self) -> None:
        """Forward again; connections made while wedged stay dead (as after a reboot
        of the peer they went to) and are closed."""
        self.forwarding = True
        for conn in list(self.connections):
            if conn.upstream is None:
                conn.transport.abortConnection()

    async def stop(self) -> None:
        for conn in list(self.connections):
            conn.transport.abortConnection()
        if self.port is not None:
            await self.port.stopListening()
