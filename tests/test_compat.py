"""The assumptions emojistream.compat makes about Twisted's private HTTP/2 code, one test
each, against Twisted's real H2Connection driven in memory by an h2 client: should
Twisted change one, the test that names it fails (and the HTTP/2 bound with it)."""

from __future__ import annotations

from collections import deque
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
