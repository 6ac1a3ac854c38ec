"""The assumptions emojistream.compat makes about Twisted's (and pyOpenSSL's) private
API, one test each, against the real classes driven in memory (Twisted's H2Connection
by an h2 client, a tcp.Connection on a socketpair, an HTTPChannel on a StringTransport):
should a release change one, the test that names it fails, saying which version broke
it. And the check that nothing outside emojistream/compat.py uses a library's private
names."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import socket
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http import HTTPChannel, Request

from emojistream.compat import h2_outbound_queue, is_h2_stream

HUGE_WINDOW = 2**31 - 1


def changed(what: str) -> str:
    """The message of a broken assumption: which library version no longer does what."""
    import OpenSSL

    import twisted

    return (f"Twisted {twisted.__version__} (pyOpenSSL {OpenSSL.__version__}) no longer "
            f"{what}: emojistream/compat.py relies on it (see its docstring) and must "
            f"change, or pyproject.toml's bound must exclude this version")


class HeldRequest(Request):
    """A request that is not answered: the test writes to it."""

    held: list[HeldRequest]

    def process(self) -> None:
        self.held.append(self)


class H2Pair:
    """Twisted's server-side H2Connection on a StringTransport and an h2 client that
    advertised every window at 2^31-1; its reactor is a MemoryReactorClock (Twisted's
    sending loop runs a frame per C{reactor.advance(0)})."""

    def __init__(self) -> None:
        from twisted.web._http2 import H2Connection

        self.reactor = MemoryReactorClock()
        self.server = H2Connection(self.reactor)
        self.held: list[HeldRequest] = []
        held = self.held

        class Held(HeldRequest):
            pass

        Held.held = held
        self.server.requestFactory = Held
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.initiate_connection()
        self.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: HUGE_WINDOW})
        self.client.increment_flow_control_window(HUGE_WINDOW - 65535)
        self.pump()

    def pump(self) -> list[Any]:
        """Client bytes to the server, server bytes to the client; the client's events."""
        self.server.dataReceived(self.client.data_to_send())
        events = self.client.receive_data(self.transport.value())
        self.transport.clear()
        return list(events)

    def get(self, path: bytes = b"/x") -> HeldRequest:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"https"),
                                             (b":authority", b"x"), (b":path", path)],
                                 end_stream=True)
        self.pump()
        return self.held[-1]

    def turn(self) -> None:
        """One reactor turn: the calls due now, not those they schedule (Twisted's
        sending loop sends a frame, if it may, and schedules itself again)."""
        now = self.reactor.seconds()
        for call in [c for c in self.reactor.getDelayedCalls() if c.getTime() <= now]:
            self.reactor.calls.remove(call)
            call.func(*call.args, **call.kw)


def queues(pair: H2Pair) -> dict[int, Any]:
    return pair.server._outboundStreamQueues  # type: ignore[no-any-return]


def test_an_h2_requests_channel_is_an_h2_stream_and_its_queue_is_found():
    pair = H2Pair()
    request = pair.get()
    assert is_h2_stream(request.channel), changed("makes H2Stream an HTTP/2 request's channel")
    queue = h2_outbound_queue(request.channel)
    assert isinstance(queue, deque), changed(
        "keeps a stream's unsent writes in H2Stream._conn._outboundStreamQueues[streamID]")
    assert queue is queues(pair)[request.channel.streamID]
    # Not an HTTP/2 stream: nothing to follow.
    assert not is_h2_stream(HTTPChannel())
    assert h2_outbound_queue(HTTPChannel()) is None
    assert h2_outbound_queue(None) is None


def test_a_full_transport_does_not_pause_a_streams_producer():
    """Why compat exists: Twisted pauses the H2Connection when its transport is full,
    never the stream's producer (only an exhausted window does). If this fails, Twisted
    now applies socket backpressure per stream, and the writer's own count of the
    queue may be simpler."""

    class Producer:
        paused = False

        def pauseProducing(self) -> None:
            self.paused = True

        def resumeProducing(self) -> None:
            self.paused = False

        def stopProducing(self) -> None:
            pass

    pair = H2Pair()
    request = pair.get()
    producer = Producer()
    request.registerProducer(producer, True)
    pair.server.pauseProducing()  # as the transport does once its buffer is full
    for _ in range(100):
        request.write(b"x" * 10_000)
        pair.turn()
    assert not producer.paused, ("Twisted now pauses an HTTP/2 stream's producer when "
                                 "its transport is full: compat's queue count may go")
    assert sum(len(c) for c in h2_outbound_queue(request.channel) or ()) == 1_000_000, \
        changed("keeps what an HTTP/2 stream could not send in its outbound queue")


def test_each_non_empty_write_is_one_entry_appended_to_the_same_queue():
    pair = H2Pair()
    request = pair.get()
    queue = h2_outbound_queue(request.channel)
    pair.server.pauseProducing()
    request.write(b"a" * 10)
    request.write(b"")
    request.write(b"b" * 20)
    assert list(queue or ()) == [b"a" * 10, b"b" * 20], changed(
        "appends each non-empty write to the stream's outbound queue as one entry")
    assert h2_outbound_queue(request.channel) is queue, changed(
        "keeps one outbound queue object for a stream's life")


def test_the_sending_loop_pops_from_the_left_and_puts_back_the_rest_of_a_large_entry():
    pair = H2Pair()
    request = pair.get()
    queue = h2_outbound_queue(request.channel)
    assert queue is not None
    request.write(b"a" * 40_000)
    request.write(b"b" * 10)
    frame = pair.client.max_inbound_frame_size
    pair.turn()
    assert [len(c) for c in queue] == [40_000 - frame, 10], changed(
        "pops a frame's worth from the left of the queue, putting the rest back at the left")
    for _ in range(5):
        pair.turn()
    assert not queue
    received = b"".join(e.data for e in pair.pump() if isinstance(e, h2.events.DataReceived))
    assert received == b"a" * 40_000 + b"b" * 10


def test_the_end_of_a_response_is_a_marker_that_is_not_bytes():
    pair = H2Pair()
    request = pair.get()
    queue = h2_outbound_queue(request.channel)
    pair.server.pauseProducing()
    request.write(b"last")
    request.finish()
    assert queue is not None and len(queue) == 2, changed(
        "appends one marker to the outbound queue at the end of a response")
    assert queue[0] == b"last" and not isinstance(queue[1], bytes), changed(
        "ends a response's outbound queue with a marker that is not bytes")


def test_a_reset_stream_loses_its_queue():
    pair = H2Pair()
    request = pair.get()
    channel = request.channel
    pair.server.pauseProducing()
    request.write(b"x" * 1000)
    channel.abortConnection()
    assert channel.streamID not in queues(pair), changed(
        "removes a reset stream's outbound queue")
    assert h2_outbound_queue(channel) is None


def test_client_service_logs_its_retries_through_its_class_logger() -> None:
    """QuietClientService quiets ClientService's line per retry by replacing its class
    attribute _log: Twisted must still log retries through it (and only through it)."""
    from twisted.application.internet import ClientService
    from twisted.internet.defer import fail
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import Clock
    from twisted.logger import Logger, globalLogPublisher

    from emojistream.compat import QuietClientService

    class Refused:
        def connect(self, factory: object) -> object:
            return fail(ConnectionRefusedError())

    assert isinstance(ClientService.__dict__.get("_log"), Logger), changed(
        "has a class attribute _log on ClientService")
    for service_type, retries_logged in ((ClientService, True), (QuietClientService, False)):
        seen: list[dict[str, object]] = []
        globalLogPublisher.addObserver(seen.append)
        clock = Clock()
        try:
            service = service_type(Refused(), Factory.forProtocol(Protocol),
                                   retryPolicy=lambda attempt: 1.0, clock=clock)
            service.startService()
            clock.advance(3.5)
            service.stopService()
        finally:
            globalLogPublisher.removeObserver(seen.append)
        logged = [e for e in seen if "Scheduling retry" in str(e.get("log_format"))]
        assert bool(logged) is retries_logged, changed(
            "logs ClientService's retries through its class attribute _log") + f": {seen}"


# -- tcp.Connection's write buffer (direct_writer) ---------------------------------------


def tcp_pair() -> tuple[Any, socket.socket]:
    """A Twisted tcp.Connection on one end of a socketpair (its reactor a MemoryReactor:
    nothing is sent but by the test's own doWrite), and the other end."""
    from twisted.internet import tcp
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactor

    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport = tcp.Connection(ours, Protocol(), MemoryReactor())
    transport.connected = True
    return transport, theirs


def received(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            more = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not more:
            return data
        data += more


def test_a_tcp_connection_keeps_its_unsent_bytes_where_direct_writer_looks() -> None:
    """direct_writer sends on the socket only while tcp.Connection holds nothing unsent,
    which it reads from C{_tempDataLen} and C{dataBuffer}: a write lands in the first,
    what a send left over in the second, and both are empty once all is out."""
    from emojistream.compat import direct_writer

    transport, peer = tcp_pair()
    try:
        write_now = direct_writer(transport)
        assert write_now is not None, changed(
            "has dataBuffer and _tempDataLen on tcp.Connection (direct_writer gave up)")
        write_now(b"one ")
        assert received(peer) == b"one ", "an idle connection's write goes out at once"

        transport.write(b"two ")  # queued for the reactor's doWrite
        assert transport._tempDataLen == 4, changed(
            "counts a write that waits for doWrite in tcp.Connection._tempDataLen")
        write_now(b"three ")
        assert received(peer) == b"", changed(
            "keeps writes that wait for doWrite in _tempDataBuffer/_tempDataLen")
        transport.doWrite()
        assert received(peer) == b"two three "
        assert not transport._tempDataLen and not transport.dataBuffer, changed(
            "empties _tempDataLen and dataBuffer once everything is sent")

        big = bytes(range(256)) * 40_000  # more than the socket buffer takes at once
        transport.write(big)
        transport.doWrite()
        assert transport.dataBuffer and not transport._tempDataLen, changed(
            "keeps what a send left over in tcp.Connection.dataBuffer")
        write_now(b"after")
        got = received(peer)
        while len(got) < len(big) + 5:
            transport.doWrite()
            got += received(peer)
        assert got == big + b"after", changed(
            "sends dataBuffer before later writes (direct_writer's order)")
    finally:
        transport.socket.close()
        peer.close()


# -- HTTPChannel's bad-request hook (BadRequestHook) -------------------------------------


class Answering:
    """A BadRequestHook channel on a StringTransport that records each bad_request."""

    def __init__(self, **settings: int) -> None:
        from emojistream.compat import BadRequestHook

        calls: list[bool] = []

        class Recording(BadRequestHook):
            def bad_request(self, head_too_large: bool) -> None:
                calls.append(head_too_large)
                super().bad_request(head_too_large)

        self.calls = calls
        self.channel = Recording()
        for name, value in settings.items():
            setattr(self.channel, name, value)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> list[bool]:
        self.channel.dataReceived(data)
        return self.calls


def test_each_request_twisted_cannot_parse_goes_through_the_bad_request_hook() -> None:
    assert Answering().send(b"GARBAGE\r\n\r\n") == [False], changed(
        "refuses a malformed request line through HTTPChannel._respondToBadRequestAndDisconnect")
    assert Answering().send(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n") == [False], changed(
        "refuses a malformed header through HTTPChannel._respondToBadRequestAndDisconnect")


def test_a_head_with_too_many_or_too_large_headers_is_told_apart() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(5))
    assert Answering(maxHeaders=3).send(head + b"\r\n") == [True], changed(
        "counts a head's headers in HTTPChannel._receivedHeaderCount and refuses past "
        "maxHeaders through _respondToBadRequestAndDisconnect")
    large = b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 300 + b"\r\n\r\n"
    assert Answering(totalHeadersSize=200).send(large) == [True], changed(
        "counts a head's bytes in HTTPChannel._receivedHeaderSize and refuses past "
        "totalHeadersSize through _respondToBadRequestAndDisconnect")
    assert Answering(maxHeaders=10).send(head + b"\r\n") == [], "a fit head is no bad request"


def test_the_hooks_default_is_twisteds_own_answer() -> None:
    answering = Answering()
    answering.send(b"GARBAGE\r\n\r\n")
    assert answering.transport.value().startswith(b"HTTP/1.1 400 Bad Request"), changed(
        "answers 400 from HTTPChannel._respondToBadRequestAndDisconnect")
    assert answering.transport.disconnecting


# -- The connection that switches to HTTP/2 (SwitchingHTTPConnection) ---------------------


def switching(negotiated: bytes | None) -> tuple[Any, list[Any], Any]:
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from emojistream.compat import SwitchingHTTPConnection

    switches: list[Any] = []

    class Recording(SwitchingHTTPConnection):
        def switched(self, before: Any) -> None:
            switches.append(before)

    site = Site(Resource())
    connection = Recording(HTTPChannel())
    connection.factory = site  # as Factory.buildProtocol does
    transport = StringTransport()
    if negotiated is not None:
        transport.negotiatedProtocol = negotiated  # type: ignore[attr-defined]
    connection.makeConnection(transport)
    return connection, switches, site


def test_twisteds_site_builds_the_protocol_switching_http_connection_extends() -> None:
    from twisted.internet.address import IPv4Address
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from emojistream.compat import SwitchingHTTPConnection

    built = Site(Resource()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert type(built) in SwitchingHTTPConnection.__mro__, changed(
        f"builds a _GenericHTTPChannelProtocol per connection (built {type(built)})")


def test_a_connection_that_negotiated_h2_switches_its_channel_and_says_so() -> None:
    from twisted.web._http2 import H2Connection

    connection, switches, site = switching(b"h2")
    first = connection.channel
    assert isinstance(first, HTTPChannel)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    connection.dataReceived(client.data_to_send())
    assert isinstance(connection.channel, H2Connection), changed(
        "replaces _GenericHTTPChannelProtocol._channel with an H2Connection after ALPN h2")
    assert switches == [first], "switched() names the channel the connection left"
    assert connection.factory is site and connection.channel.factory is site, changed(
        "passes _GenericHTTPChannelProtocol's factory on to the H2Connection")

    lost: list[Any] = []
    connection.channel.connectionLost = lost.append  # a spy on the new channel
    connection.connectionLost(ConnectionDone())
    assert len(lost) == 1, changed(
        "proxies _GenericHTTPChannelProtocol.connectionLost to its current channel")


def test_a_connection_without_h2_keeps_its_channel() -> None:
    connection, switches, site = switching(None)
    first = connection.channel
    connection.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert connection.channel is first and switches == []
    assert connection.factory is site and first.factory is site, changed(
        "sets the factory of _GenericHTTPChannelProtocol's channel through its property")


# -- A listener that fails at start (FailingEndpointService) -----------------------------


def test_a_failing_endpoint_service_raises_where_twisteds_logs() -> None:
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.defer import fail
    from twisted.internet.error import CannotListenError
    from twisted.internet.protocol import Factory, Protocol

    from emojistream.compat import FailingEndpointService

    class Refusing:
        def listen(self, factory: object) -> object:
            return fail(CannotListenError("127.0.0.1", 1, OSError("in use")))

    factory = Factory.forProtocol(Protocol)
    with pytest.raises(CannotListenError):
        FailingEndpointService(Refusing(), factory).privilegedStartService()
        pytest.fail(changed("raises from privilegedStartService when the class attribute "
                            "StreamServerEndpointService._raiseSynchronously is true"))
    # Twisted's own only logs it (so that the switch is what makes the difference).
    logged: list[dict[str, Any]] = []
    from twisted.logger import globalLogPublisher

    globalLogPublisher.addObserver(logged.append)
    try:
        StreamServerEndpointService(Refusing(), factory).privilegedStartService()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert any(e.get("log_failure") or e.get("failure") for e in logged), logged


# -- The ssl: endpoint, its options and DH parameters -----------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate, made in process (no openssl run)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_an_ssl_endpoints_options_and_address_are_where_compat_reads_them(
        tmp_path: Path) -> None:
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import MemoryReactor

    from emojistream.compat import (
        dh_parameters_path,
        ssl_endpoint_options,
        ssl_endpoint_with_creator,
    )

    key, cert = self_signed(tmp_path)
    dh = tmp_path / "dh.pem"
    dh.write_text("read only by OpenSSL, when a context loads it\n")
    reactor = MemoryReactor()
    endpoint = serverFromString(
        reactor, f"ssl:8443:privateKey={key}:certKey={cert}:dhParameters={dh}"
                 ":backlog=7:interface=127.0.0.2")
    options = ssl_endpoint_options(endpoint)
    assert getattr(options, "certificate", None) is not None and options.privateKey, \
        changed("keeps an ssl: endpoint's CertificateOptions in SSL4ServerEndpoint."
                "_sslContextFactory")
    assert dh_parameters_path(options.dhParameters) == str(dh), changed(
        "keeps the file of DiffieHellmanParameters.fromFile in its _dhFile")

    creator = object()
    factory = Factory.forProtocol(Protocol)
    ssl_endpoint_with_creator(reactor, endpoint, creator).listen(factory)
    assert reactor.sslServers == [(8443, factory, creator, 7, "127.0.0.2")], changed(
        "keeps an SSL4ServerEndpoint's port, backlog and interface in _port, _backlog "
        "and _interface")


# -- pyOpenSSL's cffi bindings (ALPN without write+execute memory) -----------------------


def test_pyopenssls_bindings_reach_the_calls_the_alpn_callback_needs() -> None:
    from OpenSSL import SSL

    from emojistream.compat import openssl_bindings, ssl_context_pointer

    try:
        ffi, lib = openssl_bindings()
    except (ImportError, AttributeError) as e:
        raise AssertionError(changed(f"exports ffi and lib from OpenSSL._util ({e})")) from e
    pointer = ssl_context_pointer(SSL.Context(SSL.TLS_METHOD))
    assert ffi.typeof(pointer) is ffi.typeof("SSL_CTX *"), changed(
        "keeps a Context's SSL_CTX * in Context._context")
    setter = ffi.typeof(lib.SSL_CTX_set_alpn_select_cb)
    assert setter.args[0] is ffi.typeof("SSL_CTX *") and setter.args[1].kind == "function", \
        changed("binds SSL_CTX_set_alpn_select_cb(SSL_CTX *, callback, void *)")
    assert ffi.typeof(lib.SSL_version).args[0] is ffi.typeof("SSL *"), changed(
        "binds SSL_version(const SSL *)")


# -- No private use of other libraries outside emojistream/compat.py ---------------------

#: Names with a leading underscore that their library documents as public.
PUBLIC_UNDERSCORED = {
    "_exit",  # os._exit: the documented way out of a forked child
    "_replace", "_asdict", "_fields", "_make",  # namedtuple's public API
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORED


@functools.cache
def _project_sources() -> dict[str, ast.Module]:
    import emojistream

    root = Path(emojistream.__file__).parent
    return {path.stem: ast.parse(path.read_text(), str(path))
            for path in sorted(root.glob("*.py"))}


def _own_private_names(trees: Iterable[ast.Module]) -> set[str]:
    """Private names the project itself defines: functions, classes, attributes it
    assigns (on self, cls or at class or module level), __slots__ entries."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif (isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "__slots__"
                          for t in node.targets)):
                names.update(c.value for c in ast.walk(node.value)
                             if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return {name for name in names if _private(name)}


_IDENTIFIER = re.compile(r"\b_[A-Za-z]\w*")


def _names_in(cls: type) -> set[str]:
    """The private names a class defines or its code uses (attributes it reads or
    sets, names it passes to getattr): from its namespace and its functions' code."""
    names = {name for name in vars(cls) if name.startswith("_")}
    codes = []
    for value in vars(cls).values():
        for part in (value, getattr(value, "__func__", None), getattr(value, "fget", None),
                     getattr(value, "fset", None)):
            code = getattr(part, "__code__", None)
            if code is not None:
                codes.append(code)
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        for const in code.co_consts:
            if isinstance(const, str):
                names.add(const)
            elif hasattr(const, "co_names"):
                codes.append(const)
    return {name for name in names if name.startswith("_")}


@functools.cache
def _foreign_names() -> set[str]:
    """Private identifiers of every library module the daemon loads (not the standard
    library's, not the project's)."""
    import emojistream

    for path in Path(emojistream.__file__).parent.glob("*.py"):
        importlib.import_module(f"emojistream.{path.stem}")
    names: set[str] = set()
    stdlib = sys.stdlib_module_names
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        if top in stdlib or top in ("emojistream", "tests", "conftest") or module is None:
            continue
        path = getattr(module, "__file__", None) or ""
        if "site-packages" not in path or not path.endswith(".py"):
            continue
        names.update(_IDENTIFIER.findall(Path(path).read_text(errors="replace")))
    return names


def _foreign_bases(cls: type) -> list[type]:
    return [base for base in cls.__mro__[1:]
            if base is not object and not base.__module__.startswith("emojistream")]


def private_uses(module: str, tree: ast.Module, own: set[str],
                 foreign: set[str]) -> list[str]:
    """Where C{tree} (emojistream.C{module}) uses another library's private names:
    imports of (or from) a private module or name; C{x._y} (or C{getattr(x, "_y")})
    on an object not C{self}/C{cls}/C{super()} where C{_y} is not the project's own
    or is a library's too; and, in a class with a library base class, C{self._y} or a
    defined C{_y} that the base (or its module) also names."""
    found: list[str] = []
    where = f"emojistream/{module}.py"

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "emojistream" and (
                    any(_private(p) for p in parts)
                    or any(_private(a.name) for a in node.names)):
                found.append(f"{where}:{node.lineno}: from {node.module} import "
                             + ", ".join(a.name for a in node.names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(p) for p in alias.name.split(".")):
                    found.append(f"{where}:{node.lineno}: import {alias.name}")

    def accessed(node: ast.AST) -> tuple[ast.expr, str] | None:
        if isinstance(node, ast.Attribute):
            return node.value, node.attr
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            return node.args[0], node.args[1].value
        return None

    def is_self(value: ast.expr) -> bool:
        return ((isinstance(value, ast.Name) and value.id in ("self", "cls"))
                or (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                    and value.func.id == "super"))

    # Accesses on other objects, anywhere in the module.
    for node in ast.walk(tree):
        access = accessed(node)
        if access is None:
            continue
        value, name = access
        if _private(name) and not is_self(value) and (name not in own or name in foreign):
            found.append(f"{where}:{node.lineno}: {ast.unparse(value)}.{name}")

    # Accesses on self, and definitions, in classes with a library base class.
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(importlib.import_module(f"emojistream.{module}"), node.name)
        bases = _foreign_bases(cls)
        if not bases:
            continue
        theirs = {base: _names_in(base) for base in bases}
        for inner in ast.walk(node):
            access = accessed(inner)
            if access is not None and is_self(access[0]):
                name = access[1]
            elif isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef) and inner in node.body:
                name = inner.name
            elif isinstance(inner, ast.Assign) and inner in node.body:
                names = [t.id for t in inner.targets if isinstance(t, ast.Name)]
                name = names[0] if names else ""
            elif isinstance(inner, ast.AnnAssign) and inner in node.body:
                name = inner.target.id if isinstance(inner.target, ast.Name) else ""
            else:
                continue
            named = [f"{b.__module__}.{b.__qualname__}" for b in bases if name in theirs[b]]
            if _private(name) and named:
                found.append(f"{where}:{inner.lineno}: {node.name}.{name} (of {named[0]})")
    return sorted(set(found))


def test_no_private_use_of_other_libraries_outside_compat() -> None:
    """Only emojistream/compat.py may rely on what Twisted (or any other library)
    keeps private, where each assumption has its test in this file."""
    trees = _project_sources()
    own = _own_private_names(tree for module, tree in trees.items() if module != "compat")
    foreign = _foreign_names()
    found = [use for module, tree in trees.items() if module != "compat"
             for use in private_uses(module, tree, own, foreign)]
    assert not found, ("private names of other libraries used outside "
                       "emojistream/compat.py:\n" + "\n".join(found))


def test_the_private_use_check_sees_what_it_must() -> None:
    """The check above flags each kind of private use it claims to (so that its
    passing means something), and not the project's own private names."""
    source = '''
from twisted.web._http2 import H2Stream
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
import OpenSSL._util
class Channel(HTTPChannel):
    _mine = 1
    def _respondToBadRequestAndDisconnect(self):
        return self._receivedHeaderCount + getattr(self, "_receivedHeaderSize", 0)
    def _own_method(self):
        return self._mine
def f(transport, endpoint, worker):
    return (transport._tempDataLen, getattr(endpoint, "_port"), worker._own_method,
            os._exit, point._replace())
'''
    tree = ast.parse(source)
    module = type(sys)("emojistream._check")
    exec(compile(tree, "check", "exec"), module.__dict__)
    sys.modules["emojistream._check"] = module
    try:
        found = private_uses("_check", tree, _own_private_names([tree]) - {"_port"},
                             {"_port", "_tempDataLen"})
    finally:
        del sys.modules["emojistream._check"]
    flagged = {use.split(": ", 1)[1].split(" ")[0] for use in found}
    assert flagged == {"from", "import", "Channel._respondToBadRequestAndDisconnect",
                       "Channel._receivedHeaderCount", "Channel._receivedHeaderSize",
                       "transport._tempDataLen", "endpoint._port"}, found
    assert len([u for u in found if ": from " in u]) == 2, found


# -- No monkeypatching of other libraries' objects ---------------------------------------


def _library_method_names() -> set[str]:
    """Names of the methods of every class in the library modules the daemon loads."""
    _foreign_names()  # imports the daemon's modules
    names: set[str] = set()
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        if (module is None or top in sys.stdlib_module_names
                or top in ("emojistream", "tests", "conftest", "test_compat")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == name:
                names.update(k for k, v in vars(value).items()
                             if inspect.isfunction(v) and not k.startswith("__"))
    return names


def monkeypatches(module: str, tree: ast.Module, methods: set[str]) -> list[str]:
    """Where C{tree} sets an attribute of something it imported (a module, a class), or
    puts a function in place of a library method on another object (C{x.write = f},
    C{protocol.connectionLost = lambda ...})."""
    imported = {alias.asname or alias.name.partition(".")[0]
                for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.AugAssign):  # x.n += 1 changes a value, not a method
            targets, value = [node.target], None
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "setattr" and len(node.args) == 3:
            target, attr, value = node.args
            if not isinstance(attr, ast.Constant):
                continue
            targets = [ast.Attribute(value=target, attr=attr.value, ctx=ast.Store())]
        else:
            continue
        for target in targets:
            if not isinstance(target, ast.Attribute):
                continue
            base = target.value
            while isinstance(base, ast.Attribute):
                base = base.value
            on_import = isinstance(base, ast.Name) and base.id in imported
            is_self = isinstance(target.value, ast.Name) and target.value.id in ("self", "cls")
            a_function = value is not None and isinstance(
                value, ast.Lambda | ast.Name | ast.Attribute)
            if on_import or (not is_self and a_function and target.attr in methods):
                found.append(f"emojistream/{module}.py:{node.lineno}: "
                             f"{ast.unparse(target)} = {ast.unparse(value) if value else ''}")
    return found


def _own_attributes(trees: Iterable[ast.Module]) -> set[str]:
    """Attributes the project's own classes have: set on C{self} or in C{__slots__}
    (C{buffer.lost = n} sets one of ours, whatever a library names a method)."""
    own: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                    and isinstance(node.value, ast.Name) and node.value.id == "self"):
                own.add(node.attr)
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1
                  and isinstance(node.targets[0], ast.Name)
                  and node.targets[0].id == "__slots__"
                  and isinstance(node.value, ast.Tuple | ast.List)):
                own.update(e.value for e in node.value.elts
                           if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return own


def test_no_monkeypatching_of_other_libraries() -> None:
    """The daemon changes no library's module, class or object behind its back: what it
    needs different it subclasses (in emojistream/compat.py when private)."""
    sources = _project_sources()
    # What the library loaded in this process names a method, less what our own
    # classes have as attributes (the check does not depend on the tests run before).
    methods = _library_method_names() - _own_attributes(sources.values())
    found = [patch for module, tree in sources.items()
             for patch in monkeypatches(module, tree, methods)]
    assert not found, "monkeypatching in emojistream/:\n" + "\n".join(found)


def test_the_monkeypatch_check_sees_what_it_must() -> None:
    tree = ast.parse('''
from twisted.internet import tcp
import twisted.web.http
tcp.Connection.write = lambda self, data: None
twisted.web.http.HTTPChannel.maxHeaders = 5
def f(protocol, transport, own):
    protocol.connectionLost = lambda reason: None
    setattr(transport, "write", own.write)
    own.size = 3
    own.size += transport.size
    protocol.factory = own
''')
    found = monkeypatches("check", tree, {"connectionLost", "write", "size"})
    assert [line.split(": ", 1)[1].split(" =")[0] for line in found] == [
        "tcp.Connection.write", "twisted.web.http.HTTPChannel.maxHeaders",
        "protocol.connectionLost", "transport.write"], found
