"""An outgoing connection kept up for good: reconnect with backoff, log state changes.

Twisted's C{ClientService} does the (re)connecting; this adds a capped, jittered
backoff that keeps growing while connections fail or close right after opening, an
optional C{prepare} step on each new connection (log in, subscribe) that must finish
within a deadline, TCP keepalive, a C{state} that status reports show, and a log line
per change of state rather than one per retry. Redis connections and the carbon
(graphite) connection use it.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from emojistream.compat import QuietClientService
from emojistream.waiting import Waiters

INITIAL_DELAY = 0.1
MAX_DELAY = 5.0
#: Seconds a new connection has to finish C{prepare} (log in, subscribe).
PREPARE_TIMEOUT = 5.0
#: Seconds a connection must stay up before a loss counts as news again, rather than
#: as one more round of a peer that accepts and then closes at once.
STABLE_AFTER = 10.0


def backoff(attempt: int, *, initial: float = INITIAL_DELAY, cap: float = MAX_DELAY,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number C{attempt}: doubling from C{initial} up to C{cap},
    each drawn from the upper half of that, so a fleet does not retry in step."""
    ceiling = min(cap, initial * 2.0 ** min(attempt - 1, 64))
    return ceiling * (0.5 + 0.5 * rand())


def enable_tcp_keepalive(transport: Any, idle: int = 10, interval: int = 5,
                         count: int = 3) -> None:
    """Have the kernel probe an idle connection, so a peer that vanished without a
    word (a dead NAT entry, a pulled cable) ends the connection within about
    C{idle + interval * count} seconds instead of never."""
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket) or handle.family not in (
            socket.AF_INET, socket.AF_INET6):
        return
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                        ("TCP_KEEPCNT", count)):
        option = getattr(socket, name, None)
        if option is not None:
            handle.setsockopt(socket.IPPROTO_TCP, option, value)


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


class _Watched(ProtocolWrapper):
    """Wraps one of the owner's protocols and, once that protocol has handled the
    end of its connection, tells the factory."""

    factory: _NotifyingFactory

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        protocol = self.wrappedProtocol
        try:
            super().connectionLost(reason)
        finally:
            self.factory.lost(protocol)


class _Building(Factory):
    """Builds the owner's protocols with the owner's callable."""

    noisy = False

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self._build()
        protocol.factory = self
        return protocol


class _NotifyingFactory(WrappingFactory):
    """Builds the owner's protocols (each wrapped in a L{_Watched}), remembers the
    latest, and tells the owner when one's connection ends.

    C{ClientService} hands C{prepareConnection} a proxy of the protocol, not the
    protocol: L{latest} is the protocol itself, the one whose loss is reported.
    """

    protocol = _Watched
    noisy = False

    def __init__(self, build: Callable[[], Protocol], on_lost: Callable[[Any], None]) -> None:
        super().__init__(_Building(build))
        self._on_lost = on_lost
        self.latest: Any = None

    def buildProtocol(self, addr: Any) -> ProtocolWrapper:
        wrapper = super().buildProtocol(addr)
        self.latest = wrapper.wrappedProtocol
        return wrapper

    def lost(self, protocol: Any) -> None:
        """C{protocol}'s connection has ended (and C{protocol} has been told)."""
        self._on_lost(protocol)


class KeptConnection(Service):
    """Keeps one connection to C{endpoint} up while running.

    A new connection is C{up} once C{prepare} has finished on it; a C{prepare} that
    fails or takes longer than C{prepare_timeout} closes the connection and the next
    attempt follows the backoff. The backoff starts again from its shortest delay
    only once a connection has stayed up for C{stable_after} seconds, so a peer that
    accepts and closes at once is retried ever more slowly, not ten times a second.

    Logged, once per change: the connection up, its loss (or failure to connect or
    log in), and a peer that keeps closing connections right after accepting them.

    @ivar state: C{"connecting"} until the first attempt ends, then C{"up"} while
        connected and prepared, C{"down"} while not, C{"stopped"} once stopped.
    @ivar protocol: the connected protocol while C{state} is C{"up"}, else None.
    @ivar losses: connections lost after they were up, since start.
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
        prepare_timeout: float = PREPARE_TIMEOUT,
        stable_after: float = STABLE_AFTER,
    ) -> None:
        #: What this connection is, for log lines ("Redis subscriber connection to ...").
        self.description = name
        self.state = "connecting"
        self.protocol: Any = None
        self.losses = 0
        self._clock = clock
        self._prepare = prepare
        self._prepare_timeout = prepare_timeout
        self._stable_after = stable_after
        self._retry_policy = retry_policy
        self._failures = 0
        # The connection being prepared or up (None between connections).
        self._current: Any = None
        self._up_since: float | None = None
        self._flapping = False
        self._loss_reason = ""
        self._stable: IDelayedCall | None = None
        # The prepare step in progress (None once it has ended either way).
        self._preparing: Deferred[None] | None = None
        # Per state: who waits for it.
        self._waiting: dict[str, Waiters[None]] = {}
        self._factory = _NotifyingFactory(build, self._lost)
        # The warnings here say what changed (down, flapping, refused) once per change,
        # not once per retry.
        self._client = QuietClientService(
            _ObservedEndpoint(endpoint, self._failed), self._factory,
            retryPolicy=self._delay, clock=clock, prepareConnection=self._ready,
        )

    def startService(self) -> None:
        super().startService()
        self._client.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.protocol = None
        self._cancel_stable()
        self._set_state("stopped")
        d: Deferred[None] = self._client.stopService()
        return d

    def when_up(self) -> Deferred[None]:
        """A Deferred that fires once the connection is (or next becomes) up."""
        return self.when_state("up")

    def when_state(self, state: str) -> Deferred[None]:
        """A Deferred that fires once C{state} is (or next becomes) C{state}."""
        if self.state == state:
            return succeed(None)
        return self._waiting.setdefault(state, Waiters()).wait()

    def _set_state(self, state: str) -> None:
        self.state = state
        waiters = self._waiting.pop(state, None)
        if waiters is not None:
            waiters.fire(None)

    def _delay(self, attempt: int) -> float:
        # ClientService counts attempts since its last successful connect, and a
        # connect that is closed at once is a success to it: count here instead.
        self._failures += 1
        return self._retry_policy(self._failures)

    def _ready(self, connected: Any) -> Deferred[None]:
        """C{ClientService}'s prepareConnection: run C{prepare} within the deadline.

        Never fails: a failed C{prepare} closes the connection, and C{ClientService}
        then retries as for any lost connection (a failure here would leave it with
        a connection it does not know how to lose). Ends by the deadline or with the
        connection at the latest, whatever C{prepare} does: C{ClientService} cannot
        lose a connection it is still preparing.
        """
        protocol = self._factory.latest
        self._current = protocol
        transport: Any = protocol.transport if protocol is not None else None
        enable_tcp_keepalive(transport)
        deadline = self._clock.callLater(self._prepare_timeout, self._too_slow, protocol)

        def done(_: object) -> None:
            if self._preparing is d:
                self._preparing = None
            if deadline.active():
                deadline.cancel()
            if self.state == "stopped" or self._current is not protocol:
                return
            self.protocol = protocol
            self._up_since = self._clock.seconds()
            self._stable = self._clock.callLater(self._stable_after, self._now_stable)
            if self.state != "up" and not self._flapping:
                self.log.info("{what} is up", what=self.description)
            self._set_state("up")

        def failed(reason: Failure) -> None:
            if self._preparing is d:
                self._preparing = None
            if deadline.active():
                deadline.cancel()
            if self._current is protocol:
                why = reason.getErrorMessage().rstrip(".")
                self._down(f"{self.description} was refused: {why}")
                if transport is not None:
                    transport.abortConnection()

        d: Deferred[None] = maybeDeferred(self._prepare, protocol)
        self._preparing = d
        return d.addCallbacks(done, failed)

    def _too_slow(self, protocol: Any) -> None:
        if self._current is protocol and protocol.transport is not None:
            self._down(f"{self.description} did not answer within "
                       f"{self._prepare_timeout:g} s")
            self._give_up_preparing()
            protocol.transport.abortConnection()

    def _give_up_preparing(self) -> None:
        preparing, self._preparing = self._preparing, None
        if preparing is not None:
            preparing.cancel()

    def _now_stable(self) -> None:
        self._stable = None
        self._failures = 0
        if self._flapping:
            self._flapping = False
            self.log.info("{what} is up and stays up", what=self.description)

    def _cancel_stable(self) -> None:
        if self._stable is not None and self._stable.active():
            self._stable.cancel()
        self._stable = None

    def _down(self, message: str) -> None:
        if self.state not in ("down", "stopped"):
            self.log.warn("{message}; retrying every {cap:g} s at most", message=message,
                          cap=MAX_DELAY)
            self._set_state("down")

    def _failed(self, reason: Failure) -> None:
        why = reason.getErrorMessage().rstrip(".")
        self._down(f"{self.description} is unreachable: {why}")

    def _lost(self, protocol: Any) -> None:
        if protocol is not self._current:
            return
        self._current = None
        if protocol is not self.protocol:
            # Lost while logging in: _ready's failure, or _too_slow, said why.
            self._down(f"{self.description} was lost while connecting")
            self._give_up_preparing()
            return
        self.protocol = None
        self.losses += 1
        self._cancel_stable()
        up_for = self._clock.seconds() - (self._up_since or 0.0)
        if self.state == "stopped":
            return
        reason, self._loss_reason = self._loss_reason, ""
        if up_for < self._stable_after and self._failures:
            # Lost again before any connection since the last loss lasted.
            if not self._flapping:
                self._flapping = True
                self.log.warn("{what} was closed {s:.1f} s after it opened; retrying "
                              "with backoff up to {cap:g} s, quietly until a connection "
                              "stays up {stable:g} s", what=self.description, s=up_for,
                              cap=MAX_DELAY, stable=self._stable_after)
            self._set_state("down")
            return
        self._down(f"{self.description} was lost{reason}")

    def hang_up(self, protocol: Any, why: str) -> None:
        """Abort C{protocol}'s connection (found dead: C{why}); a new one follows."""
        if protocol is self.protocol and protocol.transport is not None:
            self._loss_reason = f": {why}"
            protocol.transport.abortConnection()
