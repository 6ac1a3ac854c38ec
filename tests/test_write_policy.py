"""The write policy (issue 21): under the default, adaptive one a stream that hears many
messages a tick gets them in one write per tick, and every other stream gets each
message at once, in the same reactor turn, exactly as with direct writes. Driven in
memory on a clock: the daemon's router, hub, batcher and tick (its Ticker on a
MemoryReactorClock), streams on recording StringTransports; HTTP/2 on Twisted's own
H2Connection (test_compat.H2Pair)."""

from __future__ import annotations

import json
import re
from typing import Any

import h2.events
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from emojistream.batching import Batcher, Coalescing
from emojistream.subscription import Subscription
from emojistream.writers import TRANSPORT_BUFFER, ChunkFramer, Writer, chunk, writer_for
from memory import MemoryDaemon
from test_compat import H2Pair

TICK = 1 / 60


class Sends(StringTransport):
    """A StringTransport that keeps each write apart (one write, one send) and when,
    on C{clock}, it was made."""

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self.clock = clock
        self.sends: list[bytes] = []
        self.times: list[float] = []

    def write(self, data: bytes) -> None:
        self.sends.append(bytes(data))
        self.times.append(self.clock.seconds())
        super().write(data)


class ChannelRequest:
    """What a writer uses of a request on an HTTP/1.1 channel (chunked), whose
    transport records each send."""

    chunked = True

    def __init__(self, clock: Any) -> None:
        self.channel = HTTPChannel()
        self.transport = self.channel.transport = Sends(clock)  # type: ignore[assignment]
        self.producer: Any = None
        self.responseHeaders = Headers()
        self.finished = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        pass  # the response head: not what is measured

    def getHeader(self, name: bytes) -> bytes | None:
        return None

    def notifyFinish(self) -> Deferred[None]:
        return Deferred()

    def finish(self) -> None:
        self.finished = True


class Core:
    """The daemon's core (router, hub, batcher, its tick on the reactor's clock) under
    C{policy}, streams added on recording transports."""

    def __init__(self, policy: str = "", max_queue: int = 1 << 20) -> None:
        env = {"SSE_WRITE_POLICY": policy} if policy else {}
        self.daemon = MemoryDaemon({"SSE_MAX_QUEUE_BYTES": str(max_queue), **env})
        self.app = self.daemon.app
        self.clock = self.daemon.reactor
        self.framer = ChunkFramer()
        self.max_queue = max_queue
        self.transports: list[Sends] = []
        self.app.ticker.startService()

    def stop(self) -> None:
        self.app.ticker.stopService()

    def stream(self, kind: str, namespace: str) -> tuple[Writer, list[bytes]]:
        request = ChannelRequest(self.clock)
        writer = writer_for(kind, request, max_queue=self.max_queue,  # type: ignore[arg-type]
                            batcher=self.app.batcher, framer=self.framer)
        Subscription(writer, hub=self.app.hub, clock=self.clock, namespace=namespace,
                     kind=kind, client_ip="127.0.0.1").start()
        self.transports.append(request.transport)
        return writer, request.transport.sends

    def read(self, *messages: tuple[bytes, bytes]) -> None:
        """One read from Redis bringing C{messages} (channel, payload)."""
        router = self.app.router
        router.read_started()
        for channel, payload in messages:
            router.message(channel, payload)
        router.read_done()


def raw(n: int) -> bytes:
    """The hit numbered C{n} (its emoji ID says which), as a score update brings it."""
    return b"h%d" % n


def raw_chunk(n: int) -> bytes:
    return chunk(b"data:h%d\n\n" % n)


def detail_chunk(n: int) -> bytes:
    return chunk(b"event:stream.tweet_updates.A\ndata:d%d\n\n" % n)


def feed(core: Core, seconds: float, rate: float, detail_every: int, start: int = 0,
         watch: Any = None) -> int:
    """Publish C{rate} hits a second for C{seconds} on the clock (each one read: a
    score update, and every C{detail_every}th a detail update for ID A too), calling
    C{watch(n, detail)} after each; returns the next hit number."""
    n = start
    for _ in range(round(seconds * rate)):
        detail = n % detail_every == 0
        messages = [(b"stream.score_updates", raw(n))]
        if detail:
            messages.append((b"stream.tweet_updates.A", b"d%d" % n))
        core.read(*messages)
        if watch is not None:
            watch(n, detail)
        n += 1
        core.clock.advance(1 / rate)
    return n


def test_a_slow_stream_writes_at_once_and_a_fast_one_once_per_tick_in_order():
    core = Core()  # the default policy
    try:
        raw_writer, raw_sends = core.stream("raw", "/raw")
        detail_writer, detail_sends = core.stream("detail", "/details/A")
        assert core.app.settings.write_policy == "adaptive"

        def each_detail_at_once(n: int, detail: bool) -> None:
            # In the very call that handed it over: the same reactor turn.
            if detail:
                assert detail_sends[-1] == detail_chunk(n)

        # 400 hits/s, a detail update for A 10 times a second: within two decision
        # windows (30 ticks each) /raw coalesces, /details/A never does.
        n = feed(core, 1.2, 400, 40, watch=each_detail_at_once)
        assert raw_writer.coalescing and not detail_writer.coalescing

        # Now each tick writes what /raw heard since the last one, in one send, and a
        # hit waits one tick at most.
        core.clock.advance(TICK)  # what the feed left held goes
        published: dict[int, float] = {}
        sends_before = len(raw_sends)

        def watch(n: int, detail: bool) -> None:
            each_detail_at_once(n, detail)
            published[n] = core.clock.seconds()

        n = feed(core, 0.5, 400, 40, start=n, watch=watch)
        for _ in range(7):  # a tick, in the same steps
            core.clock.advance(1 / 400)
        # Every hit, in order, as the same chunks direct writes send...
        assert b"".join(raw_sends) == b"".join(raw_chunk(h) for h in range(n))
        # ...in far fewer sends than messages: one a tick (30 ticks), not 200...
        assert len(published) == 200 and len(raw_sends) - sends_before <= 32
        # ...none later than one tick after it was published (the clock moves 1/400 s
        # at a time, so a tick runs up to that late; its time is read after the step).
        times = core.transports[0].times
        waits = [at - published[int(hit)]
                 for data, at in zip(raw_sends[sends_before:], times[sends_before:],
                                     strict=True)
                 for hit in re.findall(rb"data:h(\d+)", data)]
        assert len(waits) == 200 and max(waits) <= TICK + 1 / 400 + 1e-9
    finally:
        core.stop()


def test_a_slow_stream_gets_the_same_bytes_in_the_same_sends_as_with_direct_writes():
    sends = {}
    for policy in ("direct", "adaptive"):
        core = Core(policy)
        try:
            core.stream("raw", "/raw")
            _, detail_sends = core.stream("detail", "/details/A")
            feed(core, 2, 400, 25)
            sends[policy] = detail_sends
        finally:
            core.stop()
    assert len(sends["direct"]) == 32
    assert sends["adaptive"] == sends["direct"]


def test_raw_coalesces_when_fast_stops_below_the_band_and_holds_within_it():
    core = Core()
    try:
        raw_writer, raw_sends = core.stream("raw", "/raw")
        n = feed(core, 1.1, 400, 1000)
        assert raw_writer.coalescing
        # 100 a second is inside the band (90-150): it stays as it is...
        n = feed(core, 2, 100, 1000, start=n)
        assert raw_writer.coalescing
        # ...and below it, within two windows, each message goes at once again.
        n = feed(core, 1.1, 60, 1000, start=n)
        assert not raw_writer.coalescing
        before = len(raw_sends)
        core.read((b"stream.score_updates", raw(n)))
        assert raw_sends[before:] == [raw_chunk(n)]
        # 100 a second from below the band: it does not start coalescing.
        n = feed(core, 2, 100, 1000, start=n + 1)
        assert not raw_writer.coalescing
        # Nothing lost or reordered across the switches.
        assert b"".join(raw_sends) == b"".join(raw_chunk(h) for h in range(n))
    finally:
        core.stop()


def test_a_stream_that_joins_a_coalescing_namespace_coalesces_and_the_direct_policy_never():
    core = Core()
    try:
        first, _ = core.stream("raw", "/raw")
        feed(core, 1.1, 400, 1000)
        assert first.coalescing
        late, _ = core.stream("raw", "/raw")
        assert late.coalescing
    finally:
        core.stop()
    core = Core("direct")
    try:
        writer, sends = core.stream("raw", "/raw")
        feed(core, 1.1, 400, 1000)
        assert not writer.coalescing and len(sends) == 440
    finally:
        core.stop()


def test_the_coalescing_decision_has_hysteresis():
    decide = Coalescing(window=30, on=2.5, off=1.5).coalesce
    assert not decide(74, False) and decide(75, False)
    assert decide(45, True) and not decide(44, True)
    assert decide(60, True) and not decide(60, False)
    with pytest.raises(ValueError):
        Coalescing(on=1, off=2)


def test_what_a_coalescing_stream_holds_counts_toward_the_bound():
    max_queue = TRANSPORT_BUFFER + 10_000
    core = Core(max_queue=max_queue)
    try:
        writer, _ = core.stream("raw", "/raw")
        feed(core, 1.1, 400, 1000)
        assert writer.coalescing
        # The client stops reading while the writer holds this tick's messages: what
        # it is sent piles up in the batch, and counts, before any tick comes.
        core.read((b"stream.score_updates", raw(10_000)))
        writer.pauseProducing()
        big = b"data:%s\n\n" % (b"x" * 1000)
        sent = 0
        while writer.open:
            writer.message(big)
            sent += 1
            assert sent < 20, "never dropped"
        # 10,000 bytes allowed (the bound less the transport's buffer): the tenth.
        assert sent == 10 and writer.dropped
        # A client that reads is never dropped for what the tick holds: past the bound
        # the batch goes at once.
        reader, sends = core.stream("raw", "/raw")
        assert reader.coalescing
        before = len(sends)
        for _ in range(11):
            reader.message(big)
        assert reader.open and len(sends) == before + 1
    finally:
        core.stop()


def test_eps_conflates_as_before_and_never_coalesces():
    core = Core()
    try:
        eps, sends = core.stream("eps", "/eps")
        feed(core, 1.1, 400, 1000)
        assert not eps.coalescing
        # One summary a tick, each at once.
        assert 60 <= len(sends) <= 67
        core.clock.advance(TICK)  # the summary of the last hits goes
        eps.pauseProducing()
        feed(core, 0.5, 400, 1000, start=5000)
        core.clock.advance(TICK)
        assert eps.open and eps.conflated > 0
        before = b"".join(sends)
        eps.resumeProducing()
        after = b"".join(sends)[len(before):]
        merged = json.loads(after.split(b"data:", 1)[1].split(b"\n")[0])
        assert merged == {f"h{n}": 1 for n in range(5000, 5200)}
    finally:
        core.stop()


def h2_stream(pair: H2Pair, batcher: Batcher) -> Writer:
    request = pair.get()
    writer = Writer(request, batcher=batcher)
    request.notifyFinish().addBoth(lambda _: writer.lost())
    writer.start()
    pair.turn()
    pair.pump()
    return writer


def data_frames(pair: H2Pair) -> list[bytes]:
    """The DATA frames the client receives once Twisted's sending loop has run."""
    frames: list[bytes] = []
    for _ in range(20):
        pair.turn()
        frames += [e.data for e in pair.pump() if isinstance(e, h2.events.DataReceived)]
    return frames


def test_over_http2_a_coalescing_stream_gets_one_data_frame_per_tick():
    pair = H2Pair()
    batcher = Batcher()
    fast, slow = h2_stream(pair, batcher), h2_stream(pair, batcher)
    fast.coalesce(True)
    messages = [b"data:h%d\n\n" % i for i in range(7)]
    for message in messages:
        fast.message(message)
    assert data_frames(pair) == []
    batcher.flush()  # the tick
    assert data_frames(pair) == [b"".join(messages)]
    assert fast.written == 7
    # A stream that does not coalesce: a frame per message, at once.
    for message in messages[:2]:
        slow.message(message)
    assert data_frames(pair) == messages[:2]
    # Back to a write per message: what was held goes first.
    fast.message(b"data:held\n\n")
    fast.coalesce(False)
    fast.message(b"data:now\n\n")
    assert data_frames(pair) == [b"data:held\n\n", b"data:now\n\n"]
