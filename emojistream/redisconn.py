"""One Redis connection kept up for good: reconnect, log in, report state changes.

Twisted's C{ClientService} does the (re)connecting with a capped, jittered backoff;
each new connection logs in (AUTH, SELECT) and runs the owner's C{prepare} step
(the subscriber subscribes there, since Redis forgets subscriptions with the
connection). The log says when the state changes, never once per retry.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from emojistream.config import RedisAddress

INITIAL_DELAY = 0.1
MAX_DELAY = 5.0


def backoff(attempt: int, *, initial: float = INITIAL_DELAY, cap: float = MAX_DELAY,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number C{attempt}: doubling from C{initial} up to C{cap},
    each drawn from the upper half of that, so a fleet does not retry in step."""
    ceiling = min(cap, initial * 2.0 ** min(attempt - 1, 64))
    return ceiling * (0.5 + 0.5 * rand())


class CommandProtocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    """txredisapi's protocol (hiredis parser when installed), reporting its end."""

    on_lost: Callable[[Failure], None]

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.on_lost(why)


class SubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """txredisapi's subscriber, passing each message and its end on."""

    on_lost: Callable[[Failure], None]
    on_message: Callable[[bytes, bytes], None] = staticmethod(lambda channel, payload: None)

    def messageReceived(self, pattern: bytes | None, channel: bytes, message: bytes) -> None:
        self.on_message(channel, message)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.on_lost(why)


class _ProtocolFactory(Factory):
    """Builds protocols that keep replies as bytes, exactly as Redis sent them."""

    noisy = False

    def __init__(self, protocol_class: type, configure: Callable[[Any], None]) -> None:
        self._protocol_class = protocol_class
        self._configure = configure

    def buildProtocol(self, addr: Any) -> Any:
        # charset=None and convertNumbers=False: b"2764" stays b"2764", not the int 2764.
        protocol = self._protocol_class(charset=None, convertNumbers=False)
        protocol.factory = self
        self._configure(protocol)
        return protocol


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """A client endpoint that reports why a connection attempt failed."""

    def __init__(self, endpoint: HostnameEndpoint, on_failure: Callable[[Failure], None]):
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
    """C{ClientService} without its log line per retry: L{RedisConnection} logs changes."""

    _log = Logger(observer=_Discard())


class RedisConnection(Service):
    """Keeps one connection to Redis up while running.

    @ivar state: C{"connecting"} until the first attempt ends, then C{"up"} while
        connected and prepared, C{"down"} while not, C{"stopped"} once stopped.
    @ivar protocol: the connected protocol while C{state} is C{"up"}, else None.
    """

    log = Logger()

    def __init__(
        self,
        address: RedisAddress,
        *,
        reactor: Any,
        purpose: str,
        protocol_class: type = CommandProtocol,
        configure: Callable[[Any], None] = lambda protocol: None,
        prepare: Callable[[Any], Any] = lambda protocol: None,
        select_db: bool = True,
        retry_policy: Callable[[int], float] = backoff,
    ) -> None:
        self.address = address
        self.purpose = purpose
        self.state = "connecting"
        self.protocol: Any = None
        self._prepare = prepare
        self._select_db = select_db
        self._waiting: list[tuple[str, Deferred[None]]] = []

        def configure_protocol(protocol: Any) -> None:
            protocol.on_lost = lambda why: self._lost(protocol)
            configure(protocol)

        endpoint = _ObservedEndpoint(
            HostnameEndpoint(reactor, address.host, address.port, timeout=5), self._failed
        )
        self._client = _QuietClientService(
            endpoint, _ProtocolFactory(protocol_class, configure_protocol),
            retryPolicy=retry_policy, clock=reactor, prepareConnection=self._login,
        )

    def startService(self) -> None:
        super().startService()
        self._client.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._set_state("stopped")
        self.protocol = None
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
        still = []
        for wanted, d in self._waiting:
            if wanted == state:
                d.callback(None)
            else:
                still.append((wanted, d))
        self._waiting = still

    @inlineCallbacks
    def _login(self, protocol: Any) -> Any:
        try:
            yield protocol.whenConnected()
            if self.address.password is not None:
                credentials = [self.address.password]
                if self.address.username:
                    credentials.insert(0, self.address.username)
                yield protocol.execute_command("AUTH", *credentials)
            if self._select_db and self.address.db:
                yield protocol.select(self.address.db)
            yield self._prepare(protocol)
        except Exception as e:
            self._down(f"Redis at {self.address} refused the {self.purpose} connection: {e}")
            protocol.transport.loseConnection()
            raise
        if self.state == "stopped":
            return
        self.protocol = protocol
        if self.state != "up":
            self.log.info("Redis {purpose} connection to {address} is up",
                          purpose=self.purpose, address=str(self.address))
            self._set_state("up")

    def _down(self, message: str) -> None:
        if self.state not in ("down", "stopped"):
            self.log.warn("{message}; retrying every {cap:g} s at most", message=message,
                          cap=MAX_DELAY)
            self._set_state("down")

    def _failed(self, reason: Failure) -> None:
        self._down(f"Redis at {self.address} is unreachable for the {self.purpose} "
                   f"connection: {reason.getErrorMessage()}")

    def _lost(self, protocol: Any) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self._down(f"Lost the {self.purpose} connection to Redis at {self.address}")
