"""A subscription's life, from the route's hand-over to its end: start, replay before
live events, the forced-refresh expiry, leaving the hub, a slow client dropped. Pure
logic on a Clock: a real twisted.web request on an HTTPChannel over a StringTransport,
no reactor, no socket."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from emojistream.hub import Hub
from emojistream.replay import Journal
from emojistream.stream import Stream
from emojistream.subscription import Refresh, Subscription
from emojistream.writers import writer_for
from sseclient import dechunk, response_events, split_response

REFRESH = Refresh(score_max_age=30, detail_max_age=600, score_retry_ms=2000,
                  detail_retry_ms=5000)


class Connection:
    """One client connection to an HTTPChannel over a StringTransport, and the request
    it sent, as the route would get it."""

    def __init__(self, clock: Clock, path: str = "/subscribe/raw", headers: str = "") -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4321))
        self.channel = HTTPChannel()
        self.channel.callLater = clock.callLater  # its idle timeout, on the Clock
        requests: list[Request] = []

        class Captured(Request):
            def __init__(self, channel: HTTPChannel, *args: Any) -> None:
                super().__init__(channel, *args, parsePOSTFormSubmission=False)

            def process(self) -> None:
                requests.append(self)

        self.channel.requestFactory = Captured  # type: ignore[assignment]
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: ua\r\n{headers}\r\n".encode())
        (self.request,) = requests

    def lost(self) -> None:
        """The connection ends, as the reactor tells the channel."""
        self.channel.connectionLost(Failure(ConnectionDone()))

    @property
    def head(self) -> tuple[str, dict[str, str]]:
        status, headers, _ = split_response(self.transport.value())
        return status, {name.lower(): value for name, value in headers}

    @property
    def body(self) -> bytes:
        return dechunk(split_response(self.transport.value())[2])

    @property
    def ended(self) -> bool:
        """The server ended the chunked response (its last chunk is out)."""
        return self.transport.value().endswith(b"\r\n0\r\n\r\n")

    def events(self) -> list[Any]:
        return response_events(self.transport.value()).events


class Log:
    """What a Logger emits, by format."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.logger = Logger(namespace="test", observer=self.events.append)

    def formats(self) -> list[str]:
        return [e["log_format"].split(" ", 1)[0] for e in self.events]


def subscribe(clock: Clock, hub: Hub, connection: Connection, namespace: str = "/raw",
              kind: str = "raw", log: Log | None = None, **kwargs: Any) -> Subscription:
    max_queue = kwargs.pop("max_queue", 1 << 20)
    writer = writer_for(kind, connection.request, max_queue=max_queue,
                        batcher=kwargs.pop("batcher", None), framer=None)
    return Subscription(writer, hub=hub, clock=clock, namespace=namespace,
                        kind=kind, client_ip="192.0.2.7", max_queue=max_queue,
                        log=log.logger if log is not None else None, **kwargs)


def test_a_subscription_is_a_stream():
    clock = Clock()
    stream: Stream = subscribe(clock, Hub(), Connection(clock))
    assert stream.request_path == "/subscribe/raw" and stream.kind == "raw"


def test_start_joins_the_hub_and_sends_the_head_and_the_retry_hint_at_once():
    clock, hub, log = Clock(), Hub(), Log()
    clock.advance(1000)
    connection = Connection(clock)
    subscription = subscribe(clock, hub, connection, log=log)
    assert len(hub) == 0 and connection.transport.value() == b""
    subscription.start(refresh=REFRESH)
    assert hub.in_namespace("/raw") == [subscription] and hub.from_ip("192.0.2.7") == 1
    status, headers = connection.head
    assert status == "HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
    assert connection.body == b"retry:2000\n\n"
    assert log.formats() == ["connect"] and log.events[0]["ip"] == "192.0.2.7"
    # What status shows of it, as JSON.
    clock.advance(7)
    hub.publish("/raw", b"data:1\n\n")
    assert json.loads(subscription.describe_json(clock.seconds())) == {
        "request_path": "/subscribe/raw", "namespace": "/raw", "tag": None,
        "created_at": 1000, "client_ip": "192.0.2.7", "user_agent": "ua", "age": 7,
        "msgs_sent": 1}


def test_it_expires_on_the_clock_and_leaves_the_hub():
    clock, hub = Clock(), Hub()
    connection = Connection(clock, "/subscribe/details/2665")
    subscribe(clock, hub, connection, "/details/2665", "detail").start(refresh=REFRESH)
    clock.advance(599)
    assert not connection.ended and len(hub) == 1
    clock.advance(1)
    assert connection.ended
    connection.lost()  # the client goes once it has read the end
    assert len(hub) == 0 and hub.closed == 1 and hub.dropped == 0


def test_its_end_leaves_the_hub_cancels_the_expiry_and_is_logged():
    clock, hub, log = Clock(), Hub(), Log()
    connection = Connection(clock, "/subscribe/eps")
    subscription = subscribe(clock, hub, connection, "/eps", "eps", log=log)
    subscription.start(refresh=REFRESH)
    hub.publish_summary("/eps", b'data:{"A":1}\n\n', {"A": 1})
    clock.advance(12.5)
    connection.lost()
    assert len(hub) == 0 and hub.pool_sizes()["eps"] == 0 and hub.from_ip("192.0.2.7") == 0
    assert subscription.expiry is not None and not subscription.expiry.active()
    assert hub.message_counts()["written"] == 1
    assert log.formats() == ["connect", "{what}"]
    assert log.events[1]["what"] == "disconnect" and log.events[1]["age"] == 12.5
    # A message after the end reaches no one.
    assert hub.publish("/eps", b"data:x\n\n") == 0


def test_a_resuming_client_gets_what_it_missed_before_any_live_event():
    clock, hub = Clock(), Hub()
    journal = Journal(clock, epoch="0badcafe")
    seen = journal.event("/raw", b'{"n":0}', b"stream.raw")
    missed = [journal.event("/raw", b'{"n":%d}' % n, b"stream.raw") for n in (1, 2)]
    last = seen.split(b"\n", 1)[0].removeprefix(b"id:").decode()
    connection = Connection(clock, headers=f"Last-Event-ID: {last}\r\n")
    subscribe(clock, hub, connection).start(journal)
    hub.publish("/raw", journal.event("/raw", b'{"n":3}', b"stream.raw"))
    assert [json.loads(e.data)["n"] for e in connection.events()] == [1, 2, 3]
    assert connection.body.startswith(b"".join(missed))
    assert "x-sse-gap" not in connection.head[1]


def test_a_resume_that_cannot_be_filled_says_why_in_a_header():
    clock, hub = Clock(), Hub()
    journal = Journal(clock, epoch="0badcafe")
    connection = Connection(clock, "/subscribe/raw?last_event_id=feedf00d-1")
    subscribe(clock, hub, connection).start(journal)
    assert connection.head[1]["x-sse-gap"] == "foreign"


def test_a_client_that_stops_reading_is_dropped_and_leaves_the_hub():
    clock, hub, log = Clock(), Hub(), Log()
    connection = Connection(clock)
    subscribe(clock, hub, connection, log=log, max_queue=70_000).start()
    connection.channel.pauseProducing()  # the socket is full: the transport says so
    frame = b"data:" + b"x" * 1000 + b"\n\n"
    sent = 0
    while not connection.transport.disconnected:
        hub.publish("/raw", frame)
        sent += 1
        assert sent < 100, "never dropped"
    # The writer holds max_queue less the transport's own 64 KiB: 4464 bytes.
    assert sent == 5
    connection.lost()
    assert len(hub) == 0 and hub.dropped == 1
    assert hub.message_counts() == {"written": 0, "conflated": 0, "discarded": 5}
    assert log.events[-1]["what"] == "dropped slow"
