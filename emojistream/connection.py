"""An outgoing connection kept up for good: reconnect with backoff, log state changes.

Twisted's C{ClientService} does the (re)connecting; this adds a capped, jittered
backoff, an optional C{prepare} step on each new connection (log in, subscribe), a
C{state} that status reports show, and a log line per change of state rather than
one per retry. Redis connections and the carbon (graphite) connection use it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

INITIAL_DELAY = 0.1
MAX_DELAY = 5.0


def backoff(attempt: int, *, initial: float = INITIAL_DELAY, cap: float = MAX_DELAY,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number C{attempt}: doubling from C{initial} up to C{cap},
    each drawn from the upper half of that, so a fleet does not retry in step."""
    ceiling = min(cap, initial * 2.0 ** min(attempt - 1, 64))
    return ceiling * (0.5 + 0.5 * rand())


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """A client endpoint that reports why a connection attempt failed."""

    def __init__(self, endpoint: IStreamClientEndpoint,
                 on_failure: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        def failed(reason: Failure) -> Failure:
            self._on_failure(reason)
            return reason

        d: Deferred[IProtocol] = self._endpoint.connect(factory)
        return d.addErrback(failed)


@implementer(ILogObserver)
class _Discard:
    def __call__(self, event: Any) -> None:
        pass


class _QuietClientService(ClientService):
    """C{ClientService} without its log line per retry: L{KeptConnection} logs changes."""

    _log = Logger(observer=_Discard())


class _NotifyingFactory(Factory):
    """Builds the owner's protocols and tells it when one's connection ends."""

    noisy = False

    def __init__(self, build: Callable[[], Protocol], on_lost: Callable[[Any], None]) -> None:
        self._build = build
        self._on_lost = on_lost

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self._build()
        protocol.factory = self
        lost = protocol.connectionLost
        on_lost = self._on_lost

        def connection_lost(reason: Failure = connectionDone) -> None:
            try:
                lost(reason)
            finally:
                on_lost(protocol)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]
        return protocol


class KeptConnection(Service):
    """Keeps one connection to C{endpoint} up while running.

    @ivar state: C{"connecting"} until the first attempt ends, then C{"up"} while
        connected and prepared, C{"down"} while not, C{"stopped"} once stopped.
    @ivar protocol: the connected protocol while C{state} is C{"up"}, else None.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        build: Callable[[], Protocol],
        *,
        clock: Any,
        name: str,
        prepare: Callable[[Any], Any] = lambda protocol: None,
        retry_policy: Callable[[int], float] = backoff,
    ) -> None:
        #: What this connection is, for log lines ("Redis subscriber connection to ...").
        self.description = name
        self.state = "connecting"
        self.protocol: Any = None
        self._prepare = prepare
        self._waiting: list[tuple[str, Deferred[None]]] = []
        self._client = _QuietClientService(
            _ObservedEndpoint(endpoint, self._failed),
            _NotifyingFactory(build, self._lost),
            retryPolicy=retry_policy, clock=clock, prepareConnection=self._ready,
        )

    def startService(self) -> None:
        super().startService()
        self._client.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.protocol = None
        self._set_state("stopped")
        d: Deferred[None] = self._client.stopService()
        return d

    def when_up(self) -> Deferred[None]:
        """A Deferred that fires once the connection is (or next becomes) up."""
        return self.when_state("up")

    def when_state(self, state: str) -> Deferred[None]:
        """A Deferred that fires once C{state} is (or next becomes) C{state}."""
        d: Deferred[None] = Deferred()
        if self.state == state:
            d.callback(None)
        else:
            self._waiting.append((state, d))
        return d

    def _set_state(self, state: str) -> None:
        self.state = state
        ready = [d for wanted, d in self._waiting if wanted == state]
        self._waiting = [(w, d) for w, d in self._waiting if w != state]
        for d in ready:
            d.callback(None)

    @inlineCallbacks
    def _ready(self, protocol: Any) -> Any:
        try:
            yield self._prepare(protocol)
        except Exception as e:
            self._down(f"{self.description} was refused: {e}")
            protocol.transport.loseConnection()
            raise
        if self.state == "stopped":
            return
        self.protocol = protocol
        if self.state != "up":
            self.log.info("{what} is up", what=self.description)
            self._set_state("up")

    def _down(self, message: str) -> None:
        if self.state not in ("down", "stopped"):
            self.log.warn("{message}; retrying every {cap:g} s at most", message=message,
                          cap=MAX_DELAY)
            self._set_state("down")

    def _failed(self, reason: Failure) -> None:
        why = reason.getErrorMessage().rstrip(".")
        self._down(f"{self.description} is unreachable: {why}")

    def _lost(self, protocol: Any) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self._down(f"{self.description} was lost")
