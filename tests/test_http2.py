"""HTTP/2 over TLS (ALPN): the same streams, headers and bytes as HTTP/1.1, less the
HTTP/1.1-only Connection header; checked with curl and with headless Chromium, which
holds at most six HTTP/1.1 connections per origin but multiplexes HTTP/2."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.web.server import Site
from twisted.web.static import Data

from conftest import running
from daemonproc import TwistdProcess, rss_mb
from sseclient import Client, Collector, within
from test_browser import CHROMEDRIVER, CHROMIUM, headless_chromium, wait_until
from test_tls import make_certificate

CURL = shutil.which("curl")


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path)


def listen_tls(key: Path, cert: Path) -> str:
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


def curl(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([CURL or "curl", "--http2", "-sS", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.skipif(not CURL, reason="needs curl")
@pytest_twisted.ensureDeferred
async def test_curl_over_http2_gets_the_sse_headers_and_bytes(tls, redis_server, publisher):
    key, cert = tls
    ca = str(cert.parent / "ca.pem")
    async with running({"REDIS_URL": redis_server.url}, {"listen": listen_tls(key, cert)}
                       ) as (d, _c):
        base = f"https://127.0.0.1:{d.port}"
        head = curl("--cacert", ca, "-I", base + "/subscribe/eps")
        out, err = await threads.deferToThread(head.communicate, timeout=10)
        lines = out.decode().split("\r\n")
        assert lines[0].strip() == "HTTP/2 200", (out, err)
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert headers["cache-control"] == "no-cache"
        assert headers["access-control-allow-origin"] == "*"
        assert headers["x-accel-buffering"] == "no"
        assert "connection" not in headers
        # The body: the same SSE bytes as over HTTP/1.1, not chunk-framed.
        stream = curl("--cacert", ca, "-i", "-N", "--max-time", "20",
                      base + "/subscribe/details/2665")
        out_pipe = stream.stdout
        assert out_pipe is not None

        expected = b"event:stream.tweet_updates.2665\ndata:two\ndata:lines\n\n"
        reading = threads.deferToThread(out_pipe.read)  # until curl ends
        # curl holds the head it prints until body bytes come, so nothing tells this
        # test when the stream is registered but the daemon's state: look at it.
        while not d.app.hub.in_namespace("/details/2665"):
            await deferLater(reactor, 0.01, lambda: None)
        await publisher.publish("stream.tweet_updates.2665", "two\nlines")
        await deferLater(reactor, 0.5, stream.terminate)
        output = await reading
        head, _, body = output.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/2 200")
        stream.communicate()
        assert body == expected


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>waiting</title></head>
<body><script>
const base = new URLSearchParams(location.search).get("base");
const paths = JSON.parse(new URLSearchParams(location.search).get("paths"));
window.got = {};
window.sources = [];
let opened = 0;
for (const path of paths) {
  const es = new EventSource(base + path);
  window.sources.push(es);
  const mark = (e) => { window.got[path] = e.data; };
  es.onmessage = mark;
  es.addEventListener("stream.tweet_updates." + path.split("/").pop(), mark);
  es.onopen = () => { if (++opened === paths.length) document.title = "open"; };
}
</script></body></html>"""


@pytest.fixture
def h2_browser(tls):
    """Headless Chromium that trusts the test certificate (by its key's SPKI hash)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless Chromium tests need Debian's chromium and chromium-driver")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    _key, cert = tls
    public = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    spki = public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    yield from headless_chromium("--ignore-certificate-errors-spki-list="
                                 + base64.b64encode(hashlib.sha256(spki).digest()).decode())


@pytest_twisted.ensureDeferred
async def test_ten_eventsources_to_one_origin_all_receive_over_http2(
        h2_browser, tls, redis_server, publisher):
    """Ten streams to one origin: over HTTP/1.1 a browser holds six connections per
    origin and the other four would wait; over HTTP/2 all ten share one."""
    key, cert = tls
    ids = ["2665", "1F602", "2764", "1F60D", "1F44D", "1F525", "1F64F", "1F389"]
    paths = ["/subscribe/eps", "/subscribe/raw"] + [f"/subscribe/details/{i}" for i in ids]
    resource = Data(PAGE.encode(), "text/html; charset=utf-8")
    resource.isLeaf = True
    page = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    try:
        async with running({"REDIS_URL": redis_server.url},
                           {"listen": listen_tls(key, cert)}) as (d, _c):
            url = (f"http://127.0.0.1:{page.getHost().port}/?base=https://127.0.0.1:{d.port}"
                   f"&paths={json.dumps(paths)}")
            await threads.deferToThread(h2_browser.get, url)
            await wait_until(h2_browser, lambda drv: drv.title == "open")
            assert len(d.app.hub) == 10
            published = reactor.seconds()
            await publisher.publish("stream.score_updates", "2665")
            for emoji_id in ids:
                await publisher.publish(f"stream.tweet_updates.{emoji_id}", f"tweet {emoji_id}")
            await wait_until(h2_browser, lambda drv: drv.execute_script(
                "return Object.keys(window.got).length") == 10, seconds=2)
            assert reactor.seconds() - published < 2
            got = h2_browser.execute_script("return window.got")
            # All ten requests came over HTTP/2.
            assert {s.writer.request.clientproto for s in d.app.hub.streams()} == {b"HTTP/2"}
            # Closing the EventSources resets their HTTP/2 streams: the server lets
            # each go, while the connection stays.
            finished = gatherResults([s.writer.when_finished() for s in d.app.hub.streams()])
            await threads.deferToThread(
                h2_browser.execute_script, "window.sources.forEach((es) => es.close())")
            await within(finished, 10)
            assert len(d.app.hub) == 0
    finally:
        await page.stopListening()
    assert got["/subscribe/raw"] == "2665"
    assert json.loads(got["/subscribe/eps"]) == {"2665": 1}
    for emoji_id in ids:
        assert got[f"/subscribe/details/{emoji_id}"] == f"tweet {emoji_id}"


@pytest.mark.skipif(not CURL, reason="needs curl")
@pytest_twisted.ensureDeferred
async def test_the_drain_over_http2_hints_and_ends_each_stream(tls, redis_server):
    """Over HTTP/2 a stream's end is its own (the connection may carry others)."""
    from conftest import start_daemon

    key, cert = tls
    d = await start_daemon({"REDIS_URL": redis_server.url, "SSE_DRAIN_SEC": "0.5"},
                           {"listen": listen_tls(key, cert)})
    stream = curl("--cacert", str(cert.parent / "ca.pem"), "-N", "--max-time", "20",
                  f"https://127.0.0.1:{d.port}/subscribe/raw")
    try:
        while not d.app.hub.in_namespace("/raw"):
            await deferLater(reactor, 0.01, lambda: None)
        (server_side,) = d.app.hub.in_namespace("/raw")
        assert server_side.writer.request.clientproto == b"HTTP/2"
        ended = threads.deferToThread(stream.communicate, timeout=20)
        await d.app.service.stopService()
        out, err = await ended
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.communicate()
    # curl saw the retry hint, then the end of the response (and exits 0).
    assert stream.returncode == 0, err
    assert out.startswith(b"retry:") and out.endswith(b"\n\n")
    assert 1000 <= int(out[len(b"retry:"):].split(b"\n")[0]) <= 4000


class H2Client:
    """A blocking HTTP/2 client over TLS (the h2 library; run it in a thread) that
    keeps what each of its streams receives. It grants the connection window for
    everything, and each stream's own window except for the streams in C{stalled}:
    a client that stopped reading those."""

    def __init__(self, port: int, ca: Path, stalled: frozenset[int] = frozenset(),
                 timeout: float = 20, window: int | None = None,
                 rcvbuf: int | None = None) -> None:
        import socket
        import ssl

        import h2.config
        import h2.connection
        import h2.settings

        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connecting, so that the TCP window is small from the start.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(("127.0.0.1", port))
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if window is not None:
            # Every stream's window and the connection's, as a client may set them:
            # the server is then never held back by HTTP/2 flow control.
            self.conn.update_settings(
                {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.conn.increment_flow_control_window(window - 65535)
        self.closed = False
        self.stalled = stalled
        self.timeout = timeout
        self.status: dict[int, bytes] = {}
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.data: dict[int, bytes] = {}
        self.received: dict[int, int] = {}
        self.reset: dict[int, int] = {}

    def get(self, path: str) -> int:
        """Send a GET for C{path}; its stream ID."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [
            (":method", "GET"), (":scheme", "https"), (":authority", "localhost"),
            (":path", path)], end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.data[stream_id] = b""
        self.received[stream_id] = 0
        return stream_id

    def read_until(self, done: Callable[[H2Client], bool]) -> H2Client:
        """Read until C{done(self)} holds (or the peer closes, or the timeout)."""
        import time

        import h2.events

        deadline = time.monotonic() + self.timeout
        while not done(self) and time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                break
            for event in self.conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = dict(event.headers)
                    self.status[event.stream_id] = headers[b":status"]
                    self.headers[event.stream_id] = headers
                elif isinstance(event, h2.events.DataReceived):
                    stream_id, size = event.stream_id, event.flow_controlled_length
                    self.received[stream_id] += size
                    if stream_id in self.stalled:
                        self.conn.increment_flow_control_window(size)
                    else:
                        self.data[stream_id] += event.data
                        self.conn.acknowledge_received_data(size, stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    self.reset[event.stream_id] = event.error_code
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.closed = True
            self.sock.sendall(self.conn.data_to_send())
        return self

    def close(self) -> None:
        self.sock.close()


def in_thread(port: int, ca: Path, paths: list[str], done: Callable[[H2Client], bool],
              stalled: frozenset[int] = frozenset()) -> Any:
    """Open C{paths} as streams of one HTTP/2 connection and read until C{done}, in a
    thread; fires with the client (closed)."""

    def run() -> H2Client:
        client = H2Client(port, ca, stalled)
        try:
            for path in paths:
                client.get(path)
            return client.read_until(done)
        finally:
            client.close()

    return threads.deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_over_http2_a_stream_that_is_not_read_is_reset_and_its_neighbour_goes_on(
        tls, redis_server, publisher):
    """HTTP/2 flow control: a stream whose window the client never reopens backs up
    on the server, which resets that stream alone past --max-queue-bytes; the other
    stream on the same connection keeps receiving."""
    key, cert = tls
    env = {"REDIS_URL": redis_server.url, "SSE_MAX_QUEUE_BYTES": "131072"}
    async with running(env, {"listen": listen_tls(key, cert)}) as (d, _c):
        client = in_thread(d.port, cert.parent / "ca.pem",
                           ["/subscribe/details/A", "/subscribe/details/B"],
                           lambda c: 1 in c.reset and c.data[3].count(b"\n\n") >= 100,
                           stalled=frozenset({1}))
        while len(d.app.hub) < 2:
            await deferLater(reactor, 0.01, lambda: None)
        payload = b'"' + b"x" * 4000 + b'"'
        for n in range(100):
            # 400 KB for the stalled stream: its 64 KiB window, then the queue, then more.
            await publisher.publish("stream.tweet_updates.A", payload)
            await publisher.publish("stream.tweet_updates.B", b'{"n":%d}' % n)
        seen = await within(client, 30)
    assert seen.status == {1: b"200", 3: b"200"}
    assert 1 in seen.reset and 3 not in seen.reset  # RST_STREAM for the stalled one only
    assert 60_000 <= seen.received[1] < 400_000
    events = seen.data[3].split(b"\n\n")
    assert [json.loads(e.split(b"data:", 1)[1])["n"] for e in events if b"data:" in e] \
        == list(range(100))
    # Dropped, and gone from the hub: Twisted does not tell a reset stream's request.
    assert d.app.hub.dropped == 1 and len(d.app.hub) == 0


@pytest_twisted.ensureDeferred
async def test_over_http2_keepalives_go_out_and_limits_answer_without_closing_the_connection(
        tls, redis_server):
    """An idle HTTP/2 stream gets its keepalive comments; a stream past --max-streams
    gets 503 with Retry-After, and the connection (and its other stream) stays."""
    key, cert = tls
    env = {"REDIS_URL": redis_server.url, "MAX_STREAMS": "1", "SSE_KEEPALIVE_SEC": "0.25"}
    async with running(env, {"listen": listen_tls(key, cert)}) as (_d, _c):
        seen = await within(in_thread(
            _d.port, cert.parent / "ca.pem", ["/subscribe/raw", "/subscribe/eps"],
            lambda c: 3 in c.status and c.data[1].count(b":\n\n") >= 3), 30)
    assert seen.status == {1: b"200", 3: b"503"}
    assert seen.headers[3][b"retry-after"] == b"10"
    assert seen.data[1].startswith(b":\n\n") and seen.data[1].count(b":\n\n") >= 3
    assert seen.reset == {}


class EventCounter(Collector):
    """A reader that counts the SSE data lines it receives without keeping them (a
    normal client beside the slow one; its count says when all was published)."""

    def __init__(self) -> None:
        super().__init__()
        self.events = 0
        self._tail = b""

    def dataReceived(self, data: bytes) -> None:
        joined = self._tail + data
        self.events += joined.count(b"data:")
        self._tail = joined[-4:]
        self._check()


async def tls_reader(port: int, ca: Path, path: str) -> EventCounter:
    """An HTTP/1.1-over-TLS client of C{path} that reads everything."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

    trust = ssl.Certificate.loadPEM(ca.read_bytes())
    options = ssl.optionsForClientTLS("localhost", trustRoot=trust)
    reader = EventCounter()
    await within(connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options),
                                 reader))
    assert reader.transport is not None
    reader.transport.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return reader


async def admin_status(client: Client) -> dict[str, Any]:
    _, body = await client.text("GET", "/admin/status.json")
    status: dict[str, Any] = json.loads(body)
    return status


async def until_status(client: Client, holds: Callable[[dict[str, Any]], bool],
                       seconds: float = 60) -> dict[str, Any]:
    """The daemon's status once C{holds} says so (asked again every 50 ms)."""
    deadline = reactor.seconds() + seconds
    while True:
        status = await admin_status(client)
        if holds(status):
            return status
        assert reactor.seconds() < deadline, status
        await deferLater(reactor, 0.05, lambda: None)


async def until(holds: Callable[[], bool], seconds: float = 60) -> None:
    """Return once C{holds()} (the daemon's state, looked at every 5 ms); fail after
    C{seconds}."""
    deadline = reactor.seconds() + seconds
    while not holds():
        assert reactor.seconds() < deadline, "timed out"
        await deferLater(reactor, 0.005, lambda: None)


#: The largest window HTTP/2 allows (RFC 9113 6.9.1): 2^31-1.
HUGE_WINDOW = 2**31 - 1


@pytest_twisted.ensureDeferred
async def test_over_http2_a_client_with_huge_windows_that_stops_reading_is_dropped(
        tls, redis_server, publisher):
    """Issue 18: a client that sets every HTTP/2 window to 2^31-1 and then stops reading
    its socket is never paused by flow control; what it is sent piles up in Twisted's
    HTTP/2 layer. Each of its streams is reset once past --max-queue-bytes, counted as
    dropped, what was never sent is not counted as delivered, and the daemon's memory
    does not grow with what was published (the daemon runs as twistd, for its RSS)."""
    key, cert = tls
    ca = cert.parent / "ca.pem"
    proc = TwistdProcess(
        "emojistream", "--listen", listen_tls(key, cert),
        "--admin-listen", "tcp:0:interface=127.0.0.1",
        "--redis", redis_server.url, "--node", "h2",
        "--max-queue-bytes", "262144", "--send-buffer-bytes", "4096")
    resume = threading.Event()
    slow: Any = None
    reader: EventCounter | None = None
    admin: Client | None = None
    try:
        port = int(proc.wait_for_line(r"QuietSite \(TLS\) starting on (\d+)").group(1))
        admin = Client("http://127.0.0.1:"
                       + proc.wait_for_line(r"QuietSite starting on (\d+)").group(1))
        proc.wait_for_line(r"Redis subscriber connection .* is up")
        reader = await tls_reader(port, ca, "/subscribe/details/BIG")

        def stop_reading() -> H2Client:
            client = H2Client(port, ca, window=HUGE_WINDOW, rcvbuf=4096, timeout=60)
            try:
                ids = [client.get("/subscribe/details/BIG") for _ in range(3)]
                # Not a byte read until told: the socket's buffers fill, then Twisted's.
                resume.wait(180)
                return client.read_until(lambda c: set(c.reset) >= set(ids))
            finally:
                client.close()

        slow = threads.deferToThread(stop_reading)
        await until_status(admin, lambda s: s["pools"]["detail"] == 4)
        before = rss_mb(proc.proc.pid)
        peak = before
        total = 1000
        filler = "x" * 60_000
        for seq in range(total):
            await publisher.publish("stream.tweet_updates.BIG",
                                    json.dumps({"seq": seq, "text": filler}))
            # At the pace of the reader, which must not fall 256 KiB behind itself.
            await reader.wait_for(lambda r, n=seq + 1: r.events >= n, seconds=60)
            if seq % 50 == 0:
                peak = max(peak, rss_mb(proc.proc.pid))
        peak = max(peak, rss_mb(proc.proc.pid))
        # (The status document is rebuilt at most once a second.)
        status = await until_status(
            admin, lambda s: s["totals"]["messages.received"] == total)
        resume.set()
        seen = await within(slow, 120)
        # Once the client has gone, only the reader's stream is left.
        await until_status(admin, lambda s: s["pools"]["detail"] == 1)
        after = rss_mb(proc.proc.pid)
    finally:
        resume.set()
        if reader is not None:
            reader.close()
        if admin is not None:
            await admin.close()
        proc.terminate()
    print(f"h2 client that stops reading: RSS {before:.1f} MB before, peak {peak:.1f}, "
          f"after it left {after:.1f}; totals {status['totals']}")
    totals = status["totals"]
    # Each of its three streams was reset (or the connection closed), and counted.
    assert seen.closed or set(seen.reset) == {1, 3, 5}, (seen.reset, seen.closed)
    assert totals["connections.dropped"] == 3
    assert status["pools"]["detail"] == 1
    # Delivered: the reader's 1,000 and at most the few the socket took for the other
    # three (60 kB each, socket buffers of a few kB and Twisted's 64 KiB): never what
    # sat unsent in the HTTP/2 layer.
    assert total <= totals["messages.delivered"] < total + 30
    assert totals["messages.discarded"] > 0
    # 60 MB went through; a stream holds at most 256 KiB of it.
    assert peak - before < 25, (before, peak, after)
    assert after - before < 25, (before, peak, after)


def sse_events(body: bytes) -> list[Any]:
    """The events a browser would dispatch from C{body} (an event stream's bytes)."""
    from ssespec import SpecParser

    parser = SpecParser()
    parser.feed(body)
    return parser.events


@pytest_twisted.ensureDeferred
async def test_over_http2_an_eps_client_that_stops_reading_is_conflated_and_gets_exact_totals(
        tls, redis_server, publisher):
    """Issue 18: /eps over HTTP/2 conflates for a client that stops reading as over
    HTTP/1.1 (see test_slow_clients), whatever windows the client advertised: while
    Twisted's queue for the stream is long, summaries merge into one pending summary;
    once the client has taken the queue the merged summary goes (here at the next
    keepalive tick, as nothing else is published), and the totals are exact."""
    key, cert = tls
    ca = cert.parent / "ca.pem"
    clock = Clock()
    env = {"REDIS_URL": redis_server.url, "SSE_SEND_BUFFER_BYTES": "4096"}
    async with running(env, {"listen": listen_tls(key, cert)}, clock=clock) as (d, _c):
        resume = threading.Event()
        expected: Counter[str] = Counter()

        def received(client: H2Client) -> Counter[str]:
            counts: Counter[str] = Counter()
            for event in sse_events(client.data[1]):
                counts.update(json.loads(event.data))
            return counts

        def stop_reading() -> H2Client:
            client = H2Client(d.port, ca, window=HUGE_WINDOW, rcvbuf=4096, timeout=60)
            try:
                client.get("/subscribe/eps")
                resume.wait(180)
                return client.read_until(lambda c: received(c) == expected)
            finally:
                client.close()

        slow = threads.deferToThread(stop_reading)
        try:
            await until(lambda: bool(d.app.hub.in_namespace("/eps")))
            (slow_stream,) = d.app.hub.in_namespace("/eps")
            ids = [f"{i:04X}" for i in range(0x2600, 0x2600 + 600)]  # big summaries
            ticks = backed_up_ticks = published = 0
            while backed_up_ticks < 20:
                assert ticks < 300, "the slow eps stream never backed up"
                batch = [emoji_id for n, emoji_id in enumerate(ids) if not (n + ticks) % 3]
                await gatherResults([publisher.publish("stream.score_updates", emoji_id)
                                     for emoji_id in batch])
                expected.update(batch)
                published += len(batch)
                # Every hit has reached the summarizer: then the tick sends them.
                hits = len(batch)
                await until(lambda n=hits: sum(d.app.summarizer.pending().values()) >= n)
                clock.advance(1 / 60)
                ticks += 1
                if slow_stream.writer.backed_up:
                    backed_up_ticks += 1
            assert slow_stream.writer.open and d.app.hub.dropped == 0
            # It was held back by the socket, not by HTTP/2 flow control.
            assert slow_stream.writer.request.clientproto == b"HTTP/2"
            assert slow_stream.writer.queued < 300_000
            resume.set()
            # Once the client has taken what was queued, the next keepalive tick
            # sends the merged summary.
            await until(lambda: not slow_stream.writer.backed_up)
            clock.advance(d.app.settings.keepalive)
            seen = await within(slow, 60)
            counts = d.app.hub.message_counts()
        finally:
            resume.set()
    events = sse_events(seen.data[1])
    assert received(seen) == expected and sum(expected.values()) == published
    # Fewer messages than ticks: the summaries merged while it did not read.
    assert len(events) < ticks
    # Delivered counts the summaries it was sent, merged ones once.
    assert counts["written"] == len(events)
    assert counts["conflated"] == ticks - len(events)


@pytest.mark.skipif(not CURL, reason="needs curl")
@pytest_twisted.ensureDeferred
async def test_curl_over_http2_into_a_pipe_nobody_reads_is_dropped(tls, redis_server, publisher):
    """Issue 18, as stock curl shows it: `curl --http2 -N URL | sleep` stops reading
    once the pipe is full, with the 32 MiB stream window curl advertises. It is
    dropped past --max-queue-bytes, as over HTTP/1.1, long before that window."""
    key, cert = tls
    env = {"REDIS_URL": redis_server.url, "SSE_MAX_QUEUE_BYTES": "262144",
           "SSE_SEND_BUFFER_BYTES": "4096"}
    async with running(env, {"listen": listen_tls(key, cert)}) as (d, _c):
        # Its output is a pipe this test never reads.
        stream = curl("--cacert", str(cert.parent / "ca.pem"), "-N", "--max-time", "60",
                      f"https://127.0.0.1:{d.port}/subscribe/details/X")
        try:
            await until(lambda: bool(d.app.hub.in_namespace("/details/X")))
            (server_side,) = d.app.hub.in_namespace("/details/X")
            assert server_side.writer.request.clientproto == b"HTTP/2"
            filler = "x" * 60_000
            sent = 0
            while server_side.writer.open and sent < 200:  # 12 MB, well within curl's window
                await publisher.publish("stream.tweet_updates.X",
                                        json.dumps({"seq": sent, "text": filler}))
                sent += 1
                await until(lambda n=sent, w=server_side.writer: not w.open or w.handed >= n)
            assert server_side.dropped and d.app.hub.dropped == 1, sent
            # About the pipe's, the sockets' and the bound's worth: not 12 MB.
            assert sent < 60, sent
            assert len(d.app.hub) == 0
        finally:
            stream.kill()
            stream.communicate()
