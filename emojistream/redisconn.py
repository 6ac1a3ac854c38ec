"""Redis connections: txredisapi protocols kept up by L{KeptConnection}, logged in.

Replies stay bytes exactly as Redis sent them (no charset decoding, no number
conversion: the ID C{2764} must not turn into the int 2764). txredisapi parses in C
when C{hiredis} is installed, which it is (a dependency).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import txredisapi
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint

from emojistream.config import RedisAddress
from emojistream.connection import KeptConnection, backoff

#: Seconds of silence after which a Redis connection is sent a PING; as long again
#: without an answer and the connection is taken for dead and replaced.
HEARTBEAT = 3.0


class CommandProtocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    """txredisapi's command protocol (hiredis parser), counting its reads."""

    reads = 0

    def dataReceived(self, data: bytes) -> None:
        self.reads += 1
        super().dataReceived(data)


class MessageHandler(Protocol):
    """What the subscriber hands its messages to (the router)."""

    def message(self, channel: bytes, payload: bytes) -> None:
        """One pub/sub message, exactly as published."""

    def read_started(self) -> None:
        """The messages of one read from the socket follow."""

    def read_done(self) -> None:
        """The messages of that read are all handed over."""


class SubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """txredisapi's subscriber, handing each message to C{handler} as (channel,
    payload), the messages of each read from the socket bracketed by the handler's
    C{read_started} and C{read_done}, so that what one read brings can be written
    out together."""

    reads = 0

    def __init__(self, handler: MessageHandler, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handler = handler

    def dataReceived(self, data: bytes) -> None:
        self.reads += 1
        handler = self._handler
        handler.read_started()
        try:
            super().dataReceived(data)
        finally:
            handler.read_done()

    def messageReceived(self, pattern: bytes | None, channel: bytes, message: bytes) -> None:
        self._handler.message(channel, message)


class RedisConnection(KeptConnection):
    """One Redis connection kept up: logs in (AUTH, SELECT) on every (re)connect,
    then runs C{prepare} (the subscriber subscribes there).

    A connection that has been silent for C{heartbeat} seconds is sent a PING; if
    nothing comes back within C{heartbeat} seconds more, it is replaced. A subscriber
    hears nothing while nothing is published, so silence alone proves nothing, but a
    peer that stopped answering (a wedged proxy, a dead NAT entry) would otherwise
    leave the daemon subscribed to nothing for good.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        reactor: Any,
        purpose: str,
        build: Callable[..., Any] = CommandProtocol,
        prepare: Callable[[Any], Any] = lambda protocol: None,
        select_db: bool = True,
        retry_policy: Callable[[int], float] = backoff,
        heartbeat: float = HEARTBEAT,
        endpoint: IStreamClientEndpoint | None = None,
        where: str | None = None,
    ) -> None:
        """@param endpoint: where to connect (default: C{address} over TCP); tests
            give an in-memory one.
        @param where: what log lines call the server (default: C{address})."""
        self.address = address
        self._heartbeat = heartbeat
        self._beating: IDelayedCall | None = None
        self._beat_protocol: Any = None
        self._beat_reads = -1
        self._pinged = False
        self._select_db = select_db
        self._prepare_more = prepare

        super().__init__(
            endpoint if endpoint is not None
            else HostnameEndpoint(reactor, address.host, address.port, timeout=5),
            # Replies as the bytes Redis sent: no decoding, no number conversion.
            lambda: build(charset=None, convertNumbers=False),
            clock=reactor, name=f"Redis {purpose} connection to {where or address}",
            prepare=self._login, retry_policy=retry_policy,
        )

    def startService(self) -> None:
        super().startService()
        self._beating = self._clock.callLater(self._heartbeat, self._beat)

    def stopService(self) -> Deferred[None]:
        if self._beating is not None and self._beating.active():
            self._beating.cancel()
        self._beating = None
        return super().stopService()

    def _beat(self) -> None:
        protocol = self.protocol
        if protocol is not self._beat_protocol or protocol is None \
                or protocol.reads != self._beat_reads:
            self._beat_protocol = protocol
            self._beat_reads = -1 if protocol is None else protocol.reads
            self._pinged = False
        elif self._pinged:
            self.hang_up(protocol, f"no answer to a PING within {self._heartbeat:g} s")
        else:
            self._pinged = True
            protocol.execute_command("PING").addErrback(lambda failure: None)
        self._beating = self._clock.callLater(self._heartbeat, self._beat)

    @inlineCallbacks
    def _login(self, protocol: Any) -> Any:
        yield protocol.whenConnected()
        if self.address.password is not None:
            credentials = [self.address.password]
            if self.address.username:
                credentials.insert(0, self.address.username)
            yield protocol.execute_command("AUTH", *credentials)
        if self._select_db and self.address.db:
            yield protocol.select(self.address.db)
        yield self._prepare_more(protocol)
