"""HTTP plumbing under the routes: the channel (bad requests, request-head deadline),
the request (bodies discarded), the site (no access log, socket options), and the
gate that limits connections per address and pauses accepting at the open-file limit.
"""

from __future__ import annotations

import ipaddress
import socket
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from emojistream.compat import BadRequestHook, SwitchingHTTPConnection


def _plain_response(status: bytes) -> bytes:
    body = status + b"\n"
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n" % len(body)
            + b"Access-Control-Allow-Origin: *\r\n\r\n" + body)


def plain_ip(host: str) -> str:
    """C{host} as the address it stands for: an IPv4 client of a dual-stack IPv6
    socket (systemd's C{ListenStream=PORT}) appears as C{::ffff:127.0.0.1}, and is
    counted, limited, matched and shown as C{127.0.0.1}. Anything else is unchanged.

    The one place addresses are normalised: the connection gate, the client address
    of a request (the peer's or the one a trusted proxy reports) and the status
    filter all go through it, so they agree on every client's address."""
    if ":" not in host:
        return host  # IPv4, or a name
    try:
        mapped = ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]")).ipv4_mapped
    except ValueError:
        return host
    return host if mapped is None else str(mapped)


def tcp_socket(transport: Any) -> socket.socket | None:
    """The TCP socket under C{transport}, or None. Over TLS the transport's handle is
    the TLS connection object; the socket is the handle of the transport under it."""
    for _ in range(4):
        if transport is None:
            return None
        handle = getattr(transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            return handle if handle.family in (socket.AF_INET, socket.AF_INET6) else None
        transport = getattr(transport, "transport", None)
    return None


class Channel(BadRequestHook):
    """HTTP/1.x with short text answers for requests too broken to reach a route:
    400 for a malformed request, 414 for an overlong request line, 431 for
    overlong or too many headers (Twisted's own answer has no body, or there is
    none at all), and a deadline for the whole request head.

    Twisted's idle timeout restarts with every byte, so a head trickled a line at a
    time would hold its connection forever: each head must be complete within
    C{request_timeout} seconds of the connection (or of the previous response's
    end), or it is answered 408 and closed; a connection that sent nothing of a next
    request by then is just closed. A stream, once its head is in, is never timed.

    Closing works over TLS as over TCP (L{_close}): Twisted's TLS would otherwise
    wait for this channel, its registered producer, and then for the client's
    close_notify, leaving the connection to the 60-s idle timeout.
    """

    _head_deadline: IDelayedCall | None = None
    _head_bytes = False
    _answered = False

    @property
    def request_timeout(self) -> float | None:
        """Seconds a request head may take: the site's setting."""
        return getattr(self.factory, "request_timeout", None)

    def connectionMade(self) -> None:
        self._awaiting_request_line = True
        transport: Any = self.transport
        size = getattr(self.factory, "send_buffer", 0)
        handle = tcp_socket(transport)
        if size and handle is not None:
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        super().connectionMade()
        self._start_head_deadline()

    def _start_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_bytes = False
        if self.request_timeout is not None:
            self._head_deadline = self.callLater(self.request_timeout, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        transport: Any = self.transport
        if transport is None:
            return
        if self._head_bytes:
            self._refuse(b"408 Request Timeout")
        elif self._answered:
            # Idle after a response, whose end may still be on its way out.
            self._close()
        else:
            # Nothing asked, nothing owed: no goodbye, and no TIME_WAIT left here.
            transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self._head_bytes = True
        super().dataReceived(data)

    def requestDone(self, request: Any) -> None:
        # Before Twisted goes on to a pipelined request, whose head then cancels it.
        self._answered = True
        if self.persistent:
            self._start_head_deadline()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_head_deadline()
        super().connectionLost(reason)

    def handed_over(self) -> None:
        """The connection now speaks HTTP/2 (ALPN): this channel is done with it."""
        self._cancel_head_deadline()

    def lineReceived(self, line: bytes) -> None:
        if line:
            self._awaiting_request_line = False
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        super().allHeadersReceived()
        self._awaiting_request_line = True

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(b"414 URI Too Long" if self._awaiting_request_line
                     else b"431 Request Header Fields Too Large")

    def bad_request(self, head_too_large: bool) -> None:
        # Every request Twisted cannot parse (see emojistream.compat).
        self._refuse(b"431 Request Header Fields Too Large" if head_too_large
                     else b"400 Bad Request")

    def _refuse(self, status: bytes) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(_plain_response(status))
        self._close()

    def _close(self) -> None:
        """Close once what was written has gone out, over TLS as over TCP.

        Twisted's TLS C{loseConnection} waits for the registered producer (this
        channel, which never unregisters while the connection lives) before its
        close_notify, and after it for the client's: unregistered first, and the TCP
        connection under TLS closed as soon as the close_notify is out, the client
        gets what it is owed and then the end, as over plain TCP."""
        transport: Any = self.transport
        assert transport is not None
        if isinstance(transport, TLSMemoryBIOProtocol):
            transport.unregisterProducer()
            transport.loseConnection()
            if transport.transport is not None:
                transport.transport.loseConnection()
        else:
            transport.loseConnection()


class BodilessRequest(Request):
    """A request whose body is read and thrown away: no route here uses one, so a
    large or endless body costs neither memory nor a temporary file."""

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # RFC 9112 3.2.2: a server MUST accept the absolute form
        # (GET http://host/path HTTP/1.1), whose authority replaces the Host header.
        scheme, sep, rest = path.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https") and b"/" not in scheme:
            authority, slash, tail = rest.partition(b"/")
            authority, query_sep, query = authority.partition(b"?")
            path = slash + tail if slash else b"/" + query_sep + query
            self.requestHeaders.setRawHeaders(b"Host", [authority.rpartition(b"@")[2]])
        super().requestReceived(command, path, version)

    def handleContentChunk(self, data: bytes) -> None:
        pass


class ConnectionGate:
    """Which connections are let in, shared by every listening site of the process.

    - At most C{per_ip} open connections per client address (0: no limit), counting
      every TCP connection (streams, requests in progress, idle keep-alive ones);
      one more is closed at once, before anything is read or allocated for it.
    - Near the open-file limit (C{fd_limit} less a margin for Redis, carbon, logs
      and the listeners themselves) accepting pauses, so that the process never
      meets C{EMFILE} in C{accept} (where Twisted accepts and drops each connection,
      logging every one); it resumes as soon as connections have closed. A line is
      logged when accepting pauses and when it resumes, at most one of each per
      L{LOG_EVERY} seconds (resuming takes in the queued connections, which can
      pause it again at once).

    The address is the TCP peer's: a proxy's address stands for all its clients, so
    behind a proxy C{per_ip} must stay 0.
    """

    log = Logger()
    #: Descriptors kept free of connections for everything else.
    MARGIN = 32
    #: Connections that must close before a paused accept resumes.
    HYSTERESIS = 16
    #: Seconds between two log lines of the same kind.
    LOG_EVERY = 60.0

    def __init__(self, per_ip: int = 0, fd_limit: int | None = None,
                 clock: Any = None) -> None:
        self._clock = clock
        self._logged: dict[str, float] = {}
        self._per_ip_limit = per_ip
        self._ceiling = None if fd_limit is None else max(1, fd_limit - self.MARGIN)
        self._per_ip: dict[str, int] = {}
        self._ports: list[Any] = []
        self.open = 0
        self.paused = False
        #: Connections closed at once for their address's limit, since start.
        self.refused_per_ip = 0
        #: Times accepting paused at the open-file limit, since start.
        self.accept_pauses = 0
        #: Connections closed at once because they came as accepting paused.
        self.refused_at_limit = 0

    def set_fd_limit(self, fd_limit: int | None) -> None:
        """The process's open-file limit, once known (None: unlimited)."""
        self._ceiling = None if fd_limit is None else max(1, fd_limit - self.MARGIN)

    def _may_log(self, kind: str) -> bool:
        now = self._clock.seconds() if self._clock is not None else 0.0
        last = self._logged.get(kind)
        if last is not None and 0 <= now - last < self.LOG_EVERY:
            return False
        self._logged[kind] = now
        return True

    def add_port(self, port: Any) -> None:
        """A listening port to pause and resume."""
        self._ports.append(port)
        if self.paused:
            port.stopReading()

    def admit(self, host: str) -> bool:
        """Count a new connection from C{host}, or refuse it (False)."""
        held = self._per_ip.get(host, 0)
        if self._per_ip_limit and held >= self._per_ip_limit:
            self.refused_per_ip += 1
            return False
        if self.paused:
            # Accepted in the same batch as the one that reached the limit (a port
            # accepts many at a time): closed at once, so its descriptor is free again.
            self.refused_at_limit += 1
            return False
        self._per_ip[host] = held + 1
        self.open += 1
        if self._ceiling is not None and self.open >= self._ceiling and not self.paused:
            self.paused = True
            self.accept_pauses += 1
            if self._may_log("pause"):
                self.log.warn("Open-file limit: {n} connections open; not accepting new "
                              "ones until some close", n=self.open)
            for port in self._ports:
                port.stopReading()
        return True

    def release(self, host: str) -> None:
        """A connection C{admit} let in has closed."""
        left = self._per_ip.get(host, 0) - 1
        if left > 0:
            self._per_ip[host] = left
        else:
            self._per_ip.pop(host, None)
        self.open -= 1
        if self.paused and self._ceiling is not None and \
                self.open < self._ceiling - self.HYSTERESIS:
            self.paused = False
            if self._may_log("resume"):
                self.log.info("Accepting connections again ({n} open; paused {p} times "
                              "since start)", n=self.open, p=self.accept_pauses)
            for port in self._ports:
                port.startReading()


class PerAddressRate:
    """At most C{limit} events per address in each C{per}-second window (for requests
    that are expensive to answer, such as the whole status document)."""

    def __init__(self, limit: int, per: float, clock: Any) -> None:
        self._limit = limit
        self._per = per
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}
        #: Events refused since start.
        self.refused = 0

    def allow(self, address: str) -> bool:
        now = self._clock.seconds()
        start, count = self._windows.get(address, (now, 0))
        if not 0 <= now - start < self._per:
            start, count = now, 0
        if count >= self._limit:
            self.refused += 1
            return False
        if len(self._windows) > 10_000:
            # Forget addresses whose window has passed (a flood of addresses).
            self._windows = {a: w for a, w in self._windows.items()
                             if 0 <= now - w[0] < self._per}
        self._windows[address] = (start, count + 1)
        return True


class _Connection(SwitchingHTTPConnection):
    """One client connection: HTTP/1.1 through L{Channel}, or HTTP/2 when TLS
    negotiates C{h2} (Twisted's generic channel switches), released from the
    site's L{ConnectionGate} when it ends, whichever it spoke."""

    #: The address the gate counted this connection under.
    gate_host: str | None = None

    def switched(self, before: Any) -> None:
        if isinstance(before, Channel):
            before.handed_over()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            self.channel.connectionLost(reason)
        finally:
            gate = getattr(self.factory, "gate", None)
            if gate is not None and self.gate_host is not None:
                gate.release(self.gate_host)
                self.gate_host = None


class QuietSite(Site):
    """A Site without the per-request access log (with thousands of long-lived
    streams it would drown the daemon's own log; C{--verbose} logs streams), whose
    connections pass the L{ConnectionGate}, whose request heads have a deadline,
    and that can shrink each client socket's send buffer."""

    requestFactory = BodilessRequest
    displayTracebacks = False
    # The service logs where it listens; "Starting factory" lines say nothing more.
    noisy = False

    def __init__(self, resource: IResource, send_buffer: int = 0,
                 request_timeout: float | None = None,
                 gate: ConnectionGate | None = None, reactor: Any = None) -> None:
        super().__init__(resource, reactor=reactor)
        #: SO_SNDBUF of each client socket (0: the system's).
        self.send_buffer = send_buffer
        #: Seconds a request head may take (None: no deadline).
        self.request_timeout = request_timeout
        self.gate = gate or ConnectionGate()

    def protocol(self) -> Any:
        """A connection's protocol: HTTP/1.1 (L{Channel}), or HTTP/2 after ALPN."""
        return _Connection(Channel())

    def buildProtocol(self, addr: Any) -> Any:
        host = plain_ip(str(getattr(addr, "host", "")))
        if not self.gate.admit(host):
            return None  # Twisted closes the connection at once
        protocol = super().buildProtocol(addr)
        protocol.gate_host = host
        return protocol

    def log(self, request: Any) -> None:
        pass
