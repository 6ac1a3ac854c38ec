"""Clients that stop reading: bounded memory, drop or conflate, nobody else affected."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from conftest import running
from daemonproc import TwistdProcess, rss_mb
from emojistream.demo import free_port
from sseclient import Client, response_events, slow_connect


@pytest.fixture
def daemon_process(redis_server):
    port = free_port()
    proc = TwistdProcess("emojistream", "--listen", f"tcp:{port}:interface=127.0.0.1",
                         "--redis", redis_server.url, "--node", "slow")
    try:
        assert proc.port() == port
        proc.wait_for_line(r"Redis subscriber connection .* is up")
        yield proc, port
    finally:
        proc.terminate()


@pytest_twisted.ensureDeferred
async def test_a_detail_client_that_never_reads_is_dropped_and_memory_stays_bounded(
        daemon_process, publisher):
    proc, port = daemon_process
    client = Client(f"http://127.0.0.1:{port}")
    try:
        before = rss_mb(proc.proc.pid)
        slow = slow_connect(port)
        slow.transport.write(b"GET /subscribe/details/2665 HTTP/1.1\r\nHost: x\r\n\r\n")
        _, normal = await client.stream("/subscribe/details/2665")
        # 20 MB of detail traffic: 2,000 messages of 10 kB, numbered.
        filler = "x" * 10_000
        total = 2000
        for seq in range(total):
            await publisher.publish("stream.tweet_updates.2665",
                                    json.dumps({"seq": seq, "text": filler}))
            if seq % 200 == 0:
                peak = rss_mb(proc.proc.pid)
        await normal.wait_events(total, seconds=120)
        after = rss_mb(proc.proc.pid)
        _, body = await client.text("GET", "/admin/status.json")
        status = json.loads(body)
    finally:
        await client.close()
    # The reader got every message, in order.
    assert [json.loads(e.data)["seq"] for e in normal.events] == list(range(total))
    # The one that did not read was dropped, and counted so; what it still held was
    # never written and is not counted as delivered.
    assert status["totals"]["connections.dropped"] == 1
    totals = status["totals"]
    assert totals["messages.discarded"] > 0
    assert total <= totals["messages.delivered"] <= 2 * total - totals["messages.discarded"]
    assert status["pools"]["detail"] == 1
    print(f"slow detail client: RSS {before:.1f} MB before, peak {peak:.1f}, after {after:.1f}")
    assert max(peak, after) - before < 50, (before, peak, after)
    slow.transport.resumeProducing()
    await slow.wait_closed()


@pytest_twisted.ensureDeferred
async def test_an_eps_client_that_stops_reading_is_conflated_and_gets_exact_totals(
        redis_server, publisher):
    clock = Clock()
    # The raw stream tells that every hit reached the summarizer before the test ticks
    # by hand: it must not wait for the tick (at 200 hits a tick, the adaptive policy
    # would have it coalesce). /eps is written the same under every policy.
    env = {"REDIS_URL": redis_server.url, "SSE_SEND_BUFFER_BYTES": "4096",
           "SSE_WRITE_POLICY": "direct"}
    async with running(env, clock=clock) as (d, c):
        slow = slow_connect(d.port)
        slow.transport.write(b"GET /subscribe/eps HTTP/1.1\r\nHost: x\r\n"
                             b"User-Agent: slow\r\n\r\n")
        _, normal = await c.stream("/subscribe/eps")
        _, raw = await c.stream("/subscribe/raw")
        (slow_stream,) = [s for s in d.app.hub.in_namespace("/eps") if s.user_agent == "slow"]
        ids = [f"{i:04X}" for i in range(0x2600, 0x2600 + 600)]  # big summaries
        expected: Counter[str] = Counter()
        ticks = 0
        backed_up_ticks = 0
        published = 0
        while backed_up_ticks < 20:
            assert ticks < 2000, "the slow eps stream never backed up"
            for n, emoji_id in enumerate(ids):
                if (n + ticks) % 3:
                    continue
                await publisher.publish("stream.score_updates", emoji_id)
                expected[emoji_id] += 1
                published += 1
            # Every hit has reached the summarizer once the raw stream shows it.
            await raw.wait_events(published)
            clock.advance(1 / 60)
            ticks += 1
            if slow_stream.writer.backed_up:
                backed_up_ticks += 1
        # The normal client got every summary, one per tick.
        await normal.wait_for(lambda r: sum(
            sum(json.loads(e.data).values()) for e in r.events) == published)
        assert len(normal.events) == ticks
        assert slow_stream.writer.open and d.app.hub.dropped == 0
        # The slow one resumes reading and drains: exact totals, fewer messages.
        slow.transport.resumeProducing()

        def slow_total(conn) -> int:
            return sum(sum(json.loads(e.data).values())
                       for e in response_events(conn.received).events)

        await slow.wait_for(lambda conn: slow_total(conn) >= published, seconds=60)
        events = response_events(slow.received).events
        _, body = await c.text("GET", "/admin/status.json")
        totals = json.loads(body)["totals"]
        slow.close()
    # Delivered counts what was written: every raw hit, a summary per tick to the
    # normal client, and only the merged summaries the slow one was sent.
    assert totals["messages.delivered"] == published + ticks + len(events)
    assert totals["messages.conflated"] == ticks - len(events)
    received: Counter[str] = Counter()
    for event in events:
        received.update(json.loads(event.data))
    assert received == expected
    assert len(events) < ticks


@pytest_twisted.ensureDeferred
async def test_backed_up_streams_do_not_delay_other_clients(redis_server, publisher):
    env = {"REDIS_URL": redis_server.url, "SSE_MAX_QUEUE_BYTES": "300000"}
    async with running(env) as (d, c):
        slow = [slow_connect(d.port) for _ in range(5)]
        for conn in slow:
            conn.transport.write(b"GET /subscribe/details HTTP/1.1\r\nHost: x\r\n\r\n")
        _, normal = await c.stream("/subscribe/details/A")
        payload = "y" * 5000
        total = 1000
        for seq in range(total):
            await publisher.publish("stream.tweet_updates.A", f"{seq} {payload}")
        await normal.wait_events(total)
        assert [int(e.data.split()[0]) for e in normal.events] == list(range(total))
        assert d.app.hub.dropped == 5
        for conn in slow:
            conn.close()


class FakeRequest:
    """Just what a Writer uses of a request, recording writes (pure logic test)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer = None
        self.channel = None
        self.transport = None

    def registerProducer(self, producer, streaming) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.written.append(b"<end>")


def raw_stream(request: FakeRequest, batcher=None):
    """A /raw stream's writer on C{request}, as its subscription would make it."""
    from emojistream.writers import Writer

    return Writer(request, batcher=batcher)


def test_conflation_merges_counts_while_paused():
    from emojistream.summarizer import summary_frame
    from emojistream.writers import SummaryWriter

    request = FakeRequest()
    stream = SummaryWriter(request)
    stream.start()
    stream.summary(summary_frame({"A": 1}), {"A": 1})
    stream.pauseProducing()
    stream.summary(summary_frame({"A": 2, "B": 1}), {"A": 2, "B": 1})
    stream.summary(summary_frame({"B": 4}), {"B": 4})
    assert b"".join(request.written) == b'data:{"A":1}\n\n'
    assert stream.backed_up
    stream.resumeProducing()
    assert b"".join(request.written) == b'data:{"A":1}\n\ndata:{"A":2,"B":5}\n\n'
    assert stream.handed == 2


def test_direct_writer_falls_back_where_it_cannot_send_directly():
    from twisted.internet.testing import StringTransport

    from emojistream.writers import chunk, direct_writer

    # Not a TCP connection (or a TLS one): the caller keeps the transport's write.
    assert direct_writer(StringTransport()) is None
    assert chunk(b"data:x\n\n") == b"8\r\ndata:x\n\n\r\n"


def test_batching_writes_each_streams_frames_once_per_flush_in_order():
    from emojistream.batching import Batcher

    batcher = Batcher(hold_all=True)
    request = FakeRequest()
    stream = raw_stream(request, batcher)
    stream.start(b"retry:1\n\n")
    for i in range(3):
        stream.message(b"data:%d\n\n" % i)
    assert request.written == [b"retry:1\n\n"]
    batcher.flush()
    assert request.written == [b"retry:1\n\n", b"data:0\n\ndata:1\n\ndata:2\n\n"]
    batcher.flush()
    assert len(request.written) == 2
    # Closing sends what is held first.
    stream.message(b"data:last\n\n")
    stream.close()
    assert request.written[-2:] == [b"data:last\n\n", b"<end>"] and stream.handed == 4


def test_within_one_read_a_streams_later_messages_leave_together_at_its_end():
    from emojistream.batching import Batcher

    batcher = Batcher()
    request = FakeRequest()
    stream = raw_stream(request, batcher)
    stream.start()
    # Outside a read every message goes at once.
    stream.message(b"data:0\n\n")
    assert request.written[-1] == b"data:0\n\n"
    for _ in range(2):
        batcher.begin_round()
        stream.message(b"data:1\n\n")
        # The first of a read goes at once: no latency when a read brings one message.
        assert request.written[-1] == b"data:1\n\n"
        stream.message(b"data:2\n\n")
        stream.message(b"data:3\n\n")
        assert request.written[-1] == b"data:1\n\n"
        batcher.end_round()
        assert request.written[-1] == b"data:2\n\ndata:3\n\n"
    stream.message(b"data:4\n\n")
    assert request.written[-1] == b"data:4\n\n"
    assert b"".join(request.written) == (
        b"data:0\n\n" + b"data:1\n\ndata:2\n\ndata:3\n\n" * 2 + b"data:4\n\n")
    assert stream.handed == 8


def test_a_stream_paused_within_a_read_keeps_its_order():
    from emojistream.batching import Batcher

    batcher = Batcher()
    request = FakeRequest()
    stream = raw_stream(request, batcher)
    stream.start()
    batcher.begin_round()
    stream.message(b"data:1\n\n")
    stream.message(b"data:2\n\n")
    stream.pauseProducing()
    stream.message(b"data:3\n\n")
    batcher.end_round()
    assert b"".join(request.written) == b"data:1\n\n"
    stream.resumeProducing()
    assert b"".join(request.written) == b"data:1\n\ndata:2\n\ndata:3\n\n"


@pytest_twisted.ensureDeferred
async def test_batched_mode_delivers_everything_in_order(redis_server, publisher):
    env = {"REDIS_URL": redis_server.url, "SSE_BATCH_WRITES": "yes"}
    async with running(env) as (d, c):
        assert d.app.batcher.hold_all
        _, detail = await c.stream("/subscribe/details/2665")
        _, raw = await c.stream("/subscribe/raw")
        _, eps = await c.stream("/subscribe/eps")
        for i in range(200):
            await publisher.publish("stream.tweet_updates.2665", f"m{i}")
            await publisher.publish("stream.score_updates", "2665")
        await detail.wait_events(200)
        await raw.wait_events(200)
        await eps.wait_for(lambda r: sum(json.loads(e.data)["2665"] for e in r.events) >= 200)
        assert [e.data for e in detail.events] == [f"m{i}" for i in range(200)]
        assert sum(json.loads(e.data)["2665"] for e in eps.events) == 200


def test_a_server_side_close_still_sends_what_a_backed_up_stream_holds():
    from emojistream.summarizer import summary_frame
    from emojistream.writers import SummaryWriter

    request = FakeRequest()
    stream = raw_stream(request)
    stream.start()
    stream.pauseProducing()
    stream.message(b"data:1\n\n")
    stream.message(b"data:2\n\n")
    assert b"".join(request.written) == b""
    stream.close()
    assert b"".join(request.written) == b"data:1\n\ndata:2\n\n<end>"

    request = FakeRequest()
    eps = SummaryWriter(request)
    eps.start()
    eps.pauseProducing()
    eps.summary(summary_frame({"A": 1}), {"A": 1})
    eps.summary(summary_frame({"A": 2}), {"A": 2})
    eps.close()
    assert b"".join(request.written) == b'data:{"A":3}\n\n<end>'


def test_keepalives_go_only_to_streams_idle_for_the_ticks_asked():
    from emojistream.sse import KEEPALIVE

    request = FakeRequest()
    stream = raw_stream(request)
    stream.start()
    stream.keepalive(KEEPALIVE, 1, 2)  # notices the response head went out
    stream.keepalive(KEEPALIVE, 2, 2)  # idle one tick
    stream.keepalive(KEEPALIVE, 3, 2)  # idle two: a keepalive
    stream.message(b"data:1\n\n")
    stream.keepalive(KEEPALIVE, 4, 2)  # carried a message: not idle
    stream.keepalive(KEEPALIVE, 5, 2)
    stream.keepalive(KEEPALIVE, 6, 2)  # idle two ticks again
    assert b"".join(request.written) == KEEPALIVE + b"data:1\n\n" + KEEPALIVE


@pytest.mark.slow  # a real socket pair through the reactor
@pytest_twisted.ensureDeferred
async def test_the_direct_writer_over_a_real_socket_partial_send_and_full_buffer():
    """HTTP/1.1's fast path: send() straight on the socket while the transport holds
    nothing; a partial send hands the rest to the transport, after which every write
    goes through it (in order) until it has drained."""
    import socket as socketlib

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Factory, Protocol

    from emojistream.writers import direct_writer

    accepted: Deferred[Protocol] = Deferred()

    class Server(Protocol):
        def connectionMade(self) -> None:
            handle = self.transport.getHandle()
            handle.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_SNDBUF, 4096)
            accepted.callback(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
    client = slow_connect(port.getHost().port)  # not reading yet, small receive buffer
    try:
        server = await accepted
        transport = server.transport
        write = direct_writer(transport)
        assert write is not None
        pieces = [bytes([65 + i % 26]) * 10_000 for i in range(60)]  # 600 KB
        sent_directly = []
        for piece in pieces:
            sent_directly.append(not (transport._tempDataLen or transport.dataBuffer))
            write(piece)
        # The first went straight out; once the kernel's buffers were full a send was
        # partial and the rest queued in the transport, behind which all others wait.
        assert sent_directly[0] and not all(sent_directly)
        assert transport._tempDataLen or transport.dataBuffer
        client.transport.resumeProducing()
        expected = b"".join(pieces)
        await client.wait_bytes(lambda data: len(data) >= len(expected), seconds=30)
        assert client.received == expected
    finally:
        client.close()
        await port.stopListening()
