"""What this daemon reads or overrides of Twisted's (and pyOpenSSL's) private API, in
one place; nothing else in the package may (C{tests/test_compat.py} checks it).

Each piece is a small named function or class whose docstring says what it assumes of
the library, and each assumption has its own test in C{tests/test_compat.py}, which
fails loudly, naming the installed Twisted, should a release change it. The versions
tested are pinned in C{pyproject.toml}.

Twisted's C{H2Connection} pauses a stream's producer only when that stream's HTTP/2
flow-control window is used up, never when the socket below is full: a client that
advertises a 2 GiB window and stops reading makes every write "succeed" into the
connection's per-stream outbound queue (C{_outboundStreamQueues}). To bound what a
client costs, the writer must see that queue; Twisted has no public way to show it.
Where an attribute is missing, the functions answer None and the daemon goes on
without the bound over HTTP/2 (as before), rather than breaking every HTTP/2 stream.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.application.internet import ClientService, StreamServerEndpointService
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.web._http2 import H2Stream
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from zope.interface import implementer

__all__ = [
    "BadRequestHook",
    "FailingEndpointService",
    "H2Stream",
    "QuietClientService",
    "SwitchingHTTPConnection",
    "dh_parameters_path",
    "direct_writer",
    "h2_outbound_queue",
    "is_h2_stream",
    "openssl_bindings",
    "ssl_context_pointer",
    "ssl_endpoint_options",
    "ssl_endpoint_with_creator",
]


@implementer(ILogObserver)
class _Discard:
    def __call__(self, event: Any) -> None:
        pass


class QuietClientService(ClientService):
    """C{ClientService} without its info line per retry ("Scheduling retry N to
    connect ..."): a kept connection logs once per change of state instead.

    Assumed of Twisted (tested): C{ClientService} logs through its class attribute
    C{_log}, which it hands to its state machine; there is no public way to quiet it.
    """

    _log = Logger(observer=_Discard())


def is_h2_stream(transport: object) -> bool:
    """Whether C{transport} (a request's channel) is one stream of an HTTP/2 connection."""
    return isinstance(transport, H2Stream)


def h2_outbound_queue(channel: object) -> deque[Any] | None:
    """The queue in which Twisted's HTTP/2 connection keeps what was written to the
    stream C{channel} and is not yet framed and handed to the transport, or None (not
    an HTTP/2 stream, or a Twisted that keeps no such queue).

    Assumed of Twisted (each tested): C{H2Stream._conn} is its C{H2Connection}, whose
    C{_outboundStreamQueues[streamID]} is a deque, the same object for the stream's
    life; each non-empty C{write} appends its bytes as one entry; the sending loop
    pops entries from the left, putting back at the left the rest of an entry too
    large for one frame; C{endRequest} appends a marker that is not bytes; the entry
    is removed when the stream ends or is reset.
    """
    if not isinstance(channel, H2Stream):
        return None
    queues = getattr(getattr(channel, "_conn", None), "_outboundStreamQueues", None)
    if not isinstance(queues, dict):
        return None
    queue = queues.get(getattr(channel, "streamID", None))
    return queue if isinstance(queue, deque) else None


def direct_writer(transport: Any) -> Callable[[bytes], None] | None:
    """A write function for C{transport} that sends at once on its socket while
    nothing is queued in the transport, and hands only an unsent remainder to
    C{transport.write} (which keeps the order and applies backpressure).

    Twisted's own path registers an idle socket with epoll, sends from a reactor
    callback and unregisters it again: several times the cost for the one small
    write per message that fan-out is made of. Where the transport is not a plain TCP
    or UNIX connection (TLS must encrypt), or keeps its buffer otherwise, it returns
    None and the caller uses the transport's public C{write}.

    Assumed of Twisted (tested): a C{tcp.Connection} (C{FileDescriptor}) holds what
    was written and not yet sent in C{dataBuffer} and in C{_tempDataBuffer}, whose
    byte count is C{_tempDataLen}; while both are empty nothing of it waits.
    """
    from twisted.internet import tcp

    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", True):
        return None
    if not hasattr(transport, "dataBuffer") or not hasattr(transport, "_tempDataLen"):
        return None
    try:
        sock = transport.getHandle()
    except AttributeError:
        return None
    if not isinstance(sock, socket.socket):
        return None
    send = sock.send
    write = transport.write

    def write_now(data: bytes) -> None:
        if transport._tempDataLen or transport.dataBuffer or transport.disconnecting:
            write(data)
            return
        try:
            sent = send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let the transport meet the error itself and close as it does.
            write(data)
            return
        if sent < len(data):
            write(data[sent:])

    return write_now


class BadRequestHook(HTTPChannel):
    """Twisted's C{HTTPChannel}, whose answer to a request it cannot parse is the
    subclass's L{bad_request}, told whether the head was too large.

    Assumed of Twisted (each tested): every request the channel refuses goes through
    its method C{_respondToBadRequestAndDisconnect} (a malformed request line or
    header, too many headers, a head past C{totalHeadersSize}); it counts a head's
    headers in C{_receivedHeaderCount} and its bytes in C{_receivedHeaderSize}, and
    refuses once one passes C{maxHeaders} or C{totalHeadersSize}.
    """

    def bad_request(self, head_too_large: bool) -> None:
        """Answer a request Twisted cannot parse: by default Twisted's bare 400."""
        super()._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request(self._receivedHeaderCount > self.maxHeaders
                         or self._receivedHeaderSize > self.totalHeadersSize)


class SwitchingHTTPConnection(_GenericHTTPChannelProtocol):
    """Twisted's protocol for one HTTP connection (what its C{Site} builds), which
    speaks HTTP/1.1 through the channel it was given and switches to an HTTP/2
    C{H2Connection} when TLS negotiated C{h2}; L{switched} tells the subclass.

    Assumed of Twisted (each tested): C{_GenericHTTPChannelProtocol(channel)} keeps
    its current channel in C{_channel} and replaces it, within C{dataReceived}, when
    it switches; its C{factory} property is the creating factory, passed on to the
    new channel; C{connectionLost} reaches the current channel.
    """

    @property
    def channel(self) -> Any:
        """The channel the connection speaks through now."""
        return self._channel

    def switched(self, before: Any) -> None:
        """The connection switched from channel C{before} to L{channel}."""

    def dataReceived(self, data: bytes) -> None:
        before = self._channel
        super().dataReceived(data)
        if self._channel is not before:
            self.switched(before)


class FailingEndpointService(StreamServerEndpointService):
    """A C{StreamServerEndpointService} whose C{privilegedStartService} raises when its
    endpoint cannot listen (in use, no such address), instead of logging the failure
    and starting without the port.

    Assumed of Twisted (tested): the class attribute C{_raiseSynchronously}, when
    true, makes a listen that fails at once raise out of C{privilegedStartService}
    (documented on the class, but private); there is no public switch.
    """

    _raiseSynchronously = True


def ssl_endpoint_options(endpoint: SSL4ServerEndpoint) -> Any:
    """The context factory an C{ssl:} endpoint string gave C{endpoint} (Twisted's
    C{CertificateOptions}: certificate, key, chain, DH parameters).

    Assumed of Twisted (tested): C{SSL4ServerEndpoint} keeps it in
    C{_sslContextFactory}."""
    return endpoint._sslContextFactory


def ssl_endpoint_with_creator(reactor: Any, endpoint: SSL4ServerEndpoint,
                              creator: Any) -> SSL4ServerEndpoint:
    """An endpoint on C{endpoint}'s port, backlog and interface whose TLS connections
    C{creator} makes.

    Assumed of Twisted (tested): C{SSL4ServerEndpoint} keeps those in C{_port},
    C{_backlog} and C{_interface}, and listens with them as given."""
    return SSL4ServerEndpoint(reactor, endpoint._port, creator,
                              backlog=endpoint._backlog, interface=endpoint._interface)


def dh_parameters_path(parameters: Any) -> str:
    """The file Twisted's C{DiffieHellmanParameters} (an C{ssl:} endpoint's
    C{dhParameters=}) reads its parameters from.

    Assumed of Twisted (tested): C{DiffieHellmanParameters.fromFile} keeps the
    C{FilePath} in C{_dhFile}; Twisted reads no other way."""
    return str(parameters._dhFile.path)


def openssl_bindings() -> tuple[Any, Any]:
    """pyOpenSSL's cffi C{ffi} and C{lib}, for OpenSSL calls pyOpenSSL does not wrap
    (C{SSL_CTX_set_alpn_select_cb} with a callback not made by cffi).

    Assumed of pyOpenSSL (tested): C{OpenSSL._util} exports them, C{lib} binds
    C{SSL_CTX_set_alpn_select_cb} and C{SSL_version}. Raises C{ImportError} or
    C{AttributeError} otherwise (the caller falls back to pyOpenSSL's callback)."""
    from OpenSSL._util import ffi, lib

    lib.SSL_CTX_set_alpn_select_cb  # noqa: B018 (raises AttributeError if absent)
    lib.SSL_version  # noqa: B018
    return ffi, lib


def ssl_context_pointer(context: SSL.Context) -> Any:
    """The OpenSSL C{SSL_CTX *} behind a pyOpenSSL C{Context} (a cffi pointer).

    Assumed of pyOpenSSL (tested): C{Context._context} is it."""
    return context._context
