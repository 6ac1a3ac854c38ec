"""Reports to the outside: this node's status into Redis for the admin cluster, and
pool sizes and message counts to graphite (carbon plaintext protocol)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    FirstError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from emojistream.config import GraphiteTarget
from emojistream.connection import KeptConnection

ADMIN_KEY = "admin_stream_status"
#: Next to it, each node's status without its connections (their count instead): what
#: the cluster view reads, kilobytes where the whole status is megabytes.
SUMMARY_KEY = "admin_stream_summary"
ADMIN_INTERVAL = 5.0


#: Seconds a clean stop waits for Redis to delete this node's reports.
WITHDRAW_TIMEOUT = 3.0


class AdminReporter(Service):
    """HSETs the status document under this node's name in C{admin_stream_status}
    (and, given C{summary}, the summary in C{admin_stream_summary}).

    Runs on a timer; while Redis is down a report is skipped (the connection logs
    the outage once), and a report Redis rejects is logged once until one succeeds.
    As a service, its stop takes this node's entries out of both hashes (after any
    report in flight, within L{WITHDRAW_TIMEOUT} seconds): a node stopped cleanly is
    gone from every cluster view at once instead of lingering there as stale. Its
    stop must come before its connection's.
    """

    log = Logger()

    def __init__(self, connection: Any, status: Callable[[], Deferred[bytes] | bytes],
                 node: str,
                 summary: Callable[[], Deferred[bytes] | bytes] | None = None, *,
                 clock: IReactorTime | None = None) -> None:
        self._connection = connection
        self._status = status
        self._summary = summary
        self._node = node
        self._clock = clock
        self._failing = False
        self._withdrawn = False
        self._reporting = False
        #: Reports written since start.
        self.sent = 0
        #: The Deferred of the latest report sent to Redis (None before the first).
        self.last_report: Deferred[None] | None = None

    def report(self) -> Deferred[None] | None:
        """Write one report now, if Redis is there to take it."""
        protocol = self._connection.protocol
        if protocol is None or self._withdrawn:
            return None
        if self._reporting:
            # Redis is answering slowly: one report in flight at a time, none queued.
            return None
        try:
            d: Deferred[None] = maybeDeferred(self._status).addCallback(
                lambda document: protocol.hset(ADMIN_KEY, self._node, document))
            if self._summary is not None:
                summary = self._summary
                d.addCallback(lambda _: maybeDeferred(summary)).addCallback(
                    lambda document: protocol.hset(SUMMARY_KEY, self._node, document))
        except Exception as e:
            self._failed(Failure(e))
            return None
        self._reporting = True
        self.last_report = d.addCallbacks(self._done, self._failed).addBoth(self._ended)
        return self.last_report

    def _ended(self, result: None) -> None:
        self._reporting = False

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.withdraw()

    def withdraw(self) -> Deferred[None]:
        """Stop reporting and delete this node's entries from both hashes; fires
        when Redis has done it, or at once while Redis is down (the view then drops
        the node once it has been silent long enough). Never fails."""
        self._withdrawn = True
        in_flight = self.last_report
        d: Deferred[None] = succeed(None)
        if in_flight is not None and self._reporting:
            # Its HSETs would land after the deletion: wait for them (the report
            # logs its own failure).
            d = Deferred()

            def ended(result: object, d: Deferred[None] = d) -> object:
                d.callback(None)
                return result

            in_flight.addBoth(ended)
        d.addCallback(lambda _: self._delete())
        if self._clock is not None:
            d.addTimeout(WITHDRAW_TIMEOUT, self._clock)
        return d.addErrback(self._not_withdrawn)

    def _not_withdrawn(self, reason: Failure) -> None:
        if isinstance(reason.value, FirstError):
            reason = reason.value.subFailure
        self.log.warn("Could not take this node's admin status out of Redis: {why}",
                      why=reason.getErrorMessage())

    def _delete(self) -> Deferred[None] | None:
        protocol = self._connection.protocol
        if protocol is None:
            return None
        keys = [ADMIN_KEY] + ([SUMMARY_KEY] if self._summary is not None else [])
        deletions = [protocol.hdel(key, [self._node]) for key in keys]

        def deleted(_: object) -> None:
            self.log.info("Took this node's admin status out of Redis")

        return gatherResults(deletions, consumeErrors=True).addCallback(deleted)

    def _done(self, result: object) -> None:
        self.sent += 1
        if self.sent == 1:
            self.log.info("This node's admin status is in Redis as {node!r}",
                          node=self._node)
        if self._failing:
            self._failing = False
            self.log.info("Admin status reports to Redis work again")

    def _failed(self, reason: Failure) -> None:
        if not self._failing:
            self._failing = True
            self.log.warn("Admin status report to Redis failed: {why}; skipping reports "
                          "until it works", why=reason.getErrorMessage())


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def metric_component(name: str) -> str:
    """A node name as one graphite path component: dots and the rest become C{_}."""
    return _UNSAFE.sub("_", name) or "_"


def carbon_lines(prefix: str, values: Mapping[str, float], timestamp: int) -> bytes:
    """Carbon plaintext: one C{path value timestamp} line per value, under C{prefix}."""
    return b"".join(
        f"{prefix}.{path} {value:g} {timestamp}\n".encode("ascii")
        for path, value in values.items()
    )


class CarbonReporter:
    """Every period, sends pool sizes (gauges) and what happened since the last
    report (counter deltas) to a carbon sender.

    @param gauges: current values, e.g. C{stream.eps.clients}.
    @param counters: running totals since start, e.g. C{messages.delivered}; the
        report sends how much each grew since the previous report.
    """

    def __init__(self, send: Callable[[bytes], None], *, prefix: str, clock: Any,
                 gauges: Callable[[], Mapping[str, float]],
                 counters: Callable[[], Mapping[str, float]]) -> None:
        self._send = send
        self._prefix = prefix
        self._clock = clock
        self._gauges = gauges
        self._counters = counters
        self._last = dict(counters())

    def report(self) -> None:
        """Send one batch of lines, all with the same timestamp."""
        totals = dict(self._counters())
        values = dict(self._gauges())
        for path, total in totals.items():
            values[path] = total - self._last.get(path, 0)
        self._last = totals
        self._send(carbon_lines(self._prefix, values, int(self._clock.seconds())))


def carbon_prefix(api_key: str, node: str) -> str:
    """C{[<key>.]emojistream.<node>}: the path every metric of this node lives under."""
    path = f"emojistream.{metric_component(node)}"
    return f"{api_key}.{path}" if api_key else path


@implementer(IPushProducer)
class _CarbonProtocol(Protocol):
    """A carbon connection that knows when its peer stops taking data: it is its
    transport's producer, paused once the transport's buffer is full."""

    def __init__(self) -> None:
        self.paused = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


class TcpCarbon(KeptConnection):
    """One carbon TCP connection, kept up. A report made while it is down, or while
    the relay is not reading what it was sent, is dropped and counted: what waits
    for a relay is bounded by the transport's buffer, and stopping never waits for
    a relay to read."""

    log = Logger()

    def __init__(self, target: GraphiteTarget, *, reactor: Any) -> None:
        super().__init__(
            HostnameEndpoint(reactor, target.host, target.port, timeout=5), _CarbonProtocol,
            clock=reactor, name=f"Carbon connection to {target}",
        )
        #: Reports dropped since start (relay down or not reading).
        self.dropped = 0
        self._stalled = False

    def send(self, data: bytes) -> None:
        """Write C{data} if the relay is connected and taking data, else drop it."""
        protocol = self.protocol
        if protocol is None:
            self.dropped += 1
            return
        if protocol.paused:
            self.dropped += 1
            if not self._stalled:
                self._stalled = True
                self.log.warn("{what} is not reading; dropping reports until it does",
                              what=self.description)
            return
        if self._stalled:
            self._stalled = False
            self.log.info("{what} is reading again", what=self.description)
        protocol.transport.write(data)

    def stopService(self) -> Deferred[None]:
        protocol = self.protocol
        if protocol is not None:
            # A relay that stopped reading would hold a clean close up forever.
            protocol.transport.abortConnection()
        return super().stopService()


class UdpCarbon(Service):
    """Carbon over UDP: each report is one datagram to the target."""

    log = Logger()

    def __init__(self, target: GraphiteTarget, *, reactor: Any) -> None:
        self._target = target
        self._reactor = reactor
        self._port: Any = None
        self._address: str | None = None
        self._complained = False

    def startService(self) -> None:
        super().startService()
        self._port = self._reactor.listenUDP(0, DatagramProtocol())
        self._resolve()

    def stopService(self) -> Any:
        super().stopService()
        port, self._port = self._port, None
        return port.stopListening() if port is not None else None

    def _resolve(self) -> None:
        def resolved(address: str) -> None:
            self._address = address
            self._complained = False

        def failed(reason: Failure) -> None:
            self._complain(f"cannot resolve {self._target.host}: {reason.getErrorMessage()}")

        self._reactor.resolve(self._target.host).addCallbacks(resolved, failed)

    def _complain(self, why: str) -> None:
        if not self._complained:
            self._complained = True
            self.log.warn("Carbon over UDP to {target}: {why}", target=str(self._target),
                          why=why)

    def send(self, data: bytes) -> None:
        """Send C{data} as one datagram (skipped until the host name resolves)."""
        if self._port is None:
            return
        if self._address is None:
            self._resolve()
            return
        try:
            self._port.write(data, (self._address, self._target.port))
        except OSError as e:
            self._complain(str(e))
