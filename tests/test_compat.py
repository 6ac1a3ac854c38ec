"""The assumptions emojistream.compat makes about Twisted's private HTTP/2 code, one test
each, against Twisted's real H2Connection driven in memory by an h2 client: should
Twisted change one, the test that names it fails (and the HTTP/2 bound with it)."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http import HTTPChannel, Request

from emojistream.compat import h2_outbound_queue, is_h2_stream

HUGE_WINDOW = 2**31 - 1


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
    assert is_h2_stream(request.channel)
    queue = h2_outbound_queue(request.channel)
    assert isinstance(queue, deque)
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
    assert not producer.paused
    assert sum(len(c) for c in h2_outbound_queue(request.channel) or ()) == 1_000_000


def test_each_non_empty_write_is_one_entry_appended_to_the_same_queue():
    pair = H2Pair()
    request = pair.get()
    queue = h2_outbound_queue(request.channel)
    pair.server.pauseProducing()
    request.write(b"a" * 10)
    request.write(b"")
    request.write(b"b" * 20)
    assert list(queue or ()) == [b"a" * 10, b"b" * 20]
    assert h2_outbound_queue(request.channel) is queue


def test_the_sending_loop_pops_from_the_left_and_puts_back_the_rest_of_a_large_entry():
    pair = H2Pair()
    request = pair.get()
    queue = h2_outbound_queue(request.channel)
    assert queue is not None
    request.write(b"a" * 40_000)
    request.write(b"b" * 10)
    frame = pair.client.max_inbound_frame_size
    pair.turn()
    assert [len(c) for c in queue] == [40_000 - frame, 10]
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
    assert queue is not None and len(queue) == 2
    assert queue[0] == b"last" and not isinstance(queue[1], bytes)


def test_a_reset_stream_loses_its_queue():
    pair = H2Pair()
    request = pair.get()
    channel = request.channel
    pair.server.pauseProducing()
    request.write(b"x" * 1000)
    channel.abortConnection()
    assert channel.streamID not in queues(pair)
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

    assert isinstance(ClientService.__dict__["_log"], Logger)
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
        assert bool(logged) is retries_logged, seen


# -- No private use of other libraries outside emojistream/compat.py ---------------------

#: Names with a leading underscore that their library documents as public.
PUBLIC_UNDERSCORED = {
    "_exit",  # os._exit: the documented way out of a forked child
    "_replace", "_asdict", "_fields", "_make",  # namedtuple's public API
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORED


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


def _names_in(obj: object) -> set[str]:
    """The private identifiers in C{obj}'s source (a class's, else its module's)."""
    try:
        source = inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        try:
            source = inspect.getsource(sys.modules[obj.__module__])  # type: ignore[attr-defined]
        except (OSError, TypeError, KeyError):
            return set()
    return set(_IDENTIFIER.findall(source))


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
