"""How bytes reach one client: framing, buffering, backpressure, and what happens to
the messages of a client that stops reading.

A L{Writer} is its response's push producer. While the client reads, a message goes
out at once (over HTTP/1.1 straight onto the socket, as a chunk of the chunked
response; over HTTP/2 through the request, which frames it as DATA), or, for a stream
that coalesces (one that hears many messages a tick, L{emojistream.batching}), with
the others of its tick in one write (one send; over HTTP/2 one DATA frame). Once the
transport's buffer is full the writer is paused and holds further messages itself, up
to C{max_queue} bytes in all, what it holds for the tick included; past that an event
stream's writer drops the client (aborts the connection, frees its buffers). A
L{SummaryWriter} (/eps) never drops: while paused it merges the summaries into one
pending summary (counts added per ID), so that a client that drains still gets exact
totals, in fewer messages. This module is the one place that decides.

Over HTTP/2 Twisted pauses a stream's writer only when the stream's flow-control
window is used up, never when the socket is full: everything written meanwhile waits
in Twisted's per-stream queue (L{H2Backlog} follows it), and a client that advertises
huge windows and stops reading would never be paused. There the writer counts that
queue as part of what it holds: an event stream is reset once it and the writer's own
backlog pass the bound, and /eps conflates while the queue is long. Below that queue
the h2 library keeps nothing (Twisted takes its bytes after every frame), and the TLS
records go to the TCP transport, which pauses the whole connection past its 64 KiB:
the L{TRANSPORT_BUFFER} reserved out of the bound, as over HTTP/1.1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from emojistream.batching import Batcher
from emojistream.compat import direct_writer, h2_outbound_queue, is_h2_stream
from emojistream.sse import id_line_of
from emojistream.summarizer import summary_frame
from emojistream.vocabulary import Kind

#: What a transport buffers before it pauses its producer (Twisted's bufferSize).
TRANSPORT_BUFFER = 65536


def chunk(frame: bytes) -> bytes:
    """C{frame} as one HTTP/1.1 chunk (streams to HTTP/1.1 clients are chunked)."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


class ChunkFramer:
    """Frames SSE messages as HTTP/1.1 chunks, remembering the last one: a broadcast
    hands the same frame to every writer, which is chunked once for all of them."""

    __slots__ = ("chunked", "frame")

    def __init__(self) -> None:
        self.frame = b""
        self.chunked = chunk(b"")

    def __call__(self, frame: bytes) -> bytes:
        if frame is not self.frame:
            self.frame = frame
            self.chunked = chunk(frame)
        return self.chunked


class H2Backlog:
    """What Twisted's HTTP/2 connection still holds of one stream's response: bytes
    written to the stream and not yet framed onto the connection (its per-stream
    outbound queue, L{emojistream.compat.h2_outbound_queue}), and how many messages
    among them are not wholly out.

    It mirrors that queue's entries, one per write, as (size, messages written up to
    and including this one): the queue loses entries from the left as they are sent,
    so what is still there is known in constant time per write, without summing the
    queue. The entry at the head may be what is left of one after a frame was taken
    from it: its own length is read.
    """

    __slots__ = ("_bytes", "_exempt", "_marks", "_queue", "_sent_msgs", "_total")

    def __init__(self, queue: deque[Any], msgs: int = 0) -> None:
        self._queue = queue
        self._marks: deque[tuple[int, int]] = deque(
            (len(entry), msgs) for entry in queue if isinstance(entry, bytes))
        # Bytes in _marks, and bytes ever written.
        self._bytes = self._total = sum(size for size, _ in self._marks)
        # Messages wholly out of the queue (into the transport).
        self._sent_msgs = msgs
        # Bytes ever written up to which nothing counts toward the bound (a replay).
        self._exempt = 0

    def wrote(self, size: int, msgs: int) -> None:
        """C{size} bytes (not 0) were written, which end message number C{msgs}."""
        self._marks.append((size, msgs))
        self._bytes += size
        self._total += size

    def exempt(self, size: int) -> None:
        """The next C{size} bytes written do not count toward L{counted}."""
        self._exempt = self._total + size

    def _sync(self) -> None:
        marks, queue = self._marks, self._queue
        while len(marks) > len(queue):
            size, self._sent_msgs = marks.popleft()
            self._bytes -= size

    def size(self) -> int:
        """Bytes written to the stream that Twisted has not yet sent."""
        self._sync()
        marks = self._marks
        if not marks:
            return 0
        head = self._queue[0]
        if isinstance(head, bytes):
            return self._bytes - marks[0][0] + len(head)
        return self._bytes

    def counted(self) -> int:
        """L{size}, less what is left of a replay (a resuming client's missed events,
        whose size its caller bounded): the bytes that count toward the bound."""
        size = self.size()
        return min(size, self._total - self._exempt)

    def unsent_messages(self) -> int:
        """Messages written to the stream not wholly sent (one partly framed counts)."""
        self._sync()
        marks = self._marks
        return marks[-1][1] - self._sent_msgs if marks else 0


@implementer(IPushProducer)
class Writer:
    """How one event stream's bytes reach its client (see the module docstring).

    It ends its response itself (L{close}); the web route tells Klein the response is
    under way (C{NOT_DONE_YET}), so no per-request Deferred chain stays alive as long
    as the connection does. Its subscription
    (L{emojistream.subscription.Subscription}) owns it and hands the hub its
    delivery methods.
    """

    __slots__ = (
        "_active_tick",
        "_backlog",
        "_backlog_bytes",
        "_backlog_msgs",
        "_batch",
        "_batch_bytes",
        "_batch_msgs",
        "_batcher",
        "_coalesce",
        "_framer",
        "_h2",
        "_idle_mark",
        "_limit",
        "_out",
        "_paused",
        "_request",
        "_round",
        "discarded",
        "dropped",
        "handed",
        "open",
    )

    def __init__(self, request: Request, *, max_queue: int = 1 << 20,
                 batcher: Batcher | None = None, framer: ChunkFramer | None = None) -> None:
        self._request = request
        self._batcher = batcher
        self._batch: list[bytes] = []
        # Messages (not keepalives or hints) among what the batch and backlog hold,
        # and the bytes the batch holds for the tick or took in while paused (they
        # count toward the bound; what a read holds to its end is one read's worth).
        self._batch_msgs = 0
        self._batch_bytes = 0
        # Whether everything waits for the batcher's tick (the write policy decides).
        self._coalesce = batcher is not None and batcher.hold_all
        self._backlog_msgs = 0
        self._round = 0
        #: Messages handed to this writer to write (see L{written}).
        self.handed = 0
        #: Of those, the ones never written: held when the connection ended.
        self.discarded = 0
        # handed at the last keepalive tick (unchanged: idle since then), and the last
        # tick that found the stream had been written to. -1: the response head
        # written at the start counts as a write.
        self._idle_mark = -1
        self._active_tick = 0
        self.open = True
        #: True once the server dropped this client for not keeping up.
        self.dropped = False
        self._paused = False
        # HTTP/1.1 chunk framing, decided at start (None: frames go as they are).
        self._framer: ChunkFramer | None = framer
        self._out: Callable[[bytes], None] = request.write
        self._backlog: deque[tuple[bytes, int]] | None = None
        self._backlog_bytes = 0
        # The transport holds up to TRANSPORT_BUFFER before pausing us; we hold the rest
        # (over HTTP/2, with what waits in Twisted's queue for the stream).
        self._limit = max(0, max_queue - TRANSPORT_BUFFER)
        # Over HTTP/2, what Twisted holds of this stream (None over HTTP/1.x).
        self._h2: H2Backlog | None = None

    #: Whether this writer drops a client whose unsent bytes pass the bound (an
    #: event stream's does; /eps conflates instead).
    drops = True

    @property
    def request(self) -> Request:
        """The response this writer writes."""
        return self._request

    def start(self, first: bytes = b"") -> None:
        """Register as the response's producer and send the status line, headers
        and C{first} (possibly empty) at once, before any event."""
        request = self._request
        request.registerProducer(self, True)
        request.write(first)
        # They are on the wire and nothing reads them again; each client's copy of
        # the response headers would cost about a kilobyte for the life of the stream.
        request.responseHeaders = Headers()
        # From here on the response body is ours to frame and write: over HTTP/1.x
        # straight to the connection (as chunks of a chunked response), over HTTP/2
        # through the request, which frames it as DATA on the request's stream.
        channel = getattr(request, "channel", None)
        if not isinstance(channel, HTTPChannel):
            self._framer = None
            queue = h2_outbound_queue(channel)
            if queue is not None:
                self._h2 = H2Backlog(queue)
                self._out = self._h2_write
            return
        if getattr(request, "chunked", False):
            if self._framer is None:
                self._framer = ChunkFramer()
        else:
            self._framer = None
        transport = channel.transport
        if transport is not None:
            self._out = direct_writer(transport) or transport.write

    def when_finished(self) -> Deferred[None]:
        """A Deferred that fires once the response is over, whoever ended it."""
        d: Deferred[None] = Deferred()
        self._request.notifyFinish().addBoth(lambda _: d.callback(None))
        return d

    @property
    def backed_up(self) -> bool:
        """Whether the client's transport is full and this writer is holding back (over
        HTTP/2: or a transport's buffer worth waits in Twisted's queue)."""
        h2 = self._h2
        return self._paused or (h2 is not None and h2.size() >= TRANSPORT_BUFFER)

    @property
    def queued(self) -> int:
        """Bytes this writer holds back because the client is not reading (over HTTP/2,
        with those waiting in Twisted's queue for the stream)."""
        h2 = self._h2
        return self._backlog_bytes + (0 if h2 is None else h2.size())

    @property
    def written(self) -> int:
        """Messages written to the client's connection (handed to its transport; over
        HTTP/2, out of Twisted's queue for the stream)."""
        written = self.handed - self.discarded - self._batch_msgs - self._backlog_msgs
        h2 = self._h2
        return written if h2 is None else written - h2.unsent_messages()

    def _wire(self, frame: bytes) -> bytes:
        """C{frame} as it goes on the wire: one chunk of a chunked response, or as is."""
        framer = self._framer
        return frame if framer is None else framer(frame)

    def message(self, frame: bytes) -> None:
        """Write one encoded message (held back while paused); counted in C{handed}."""
        if not self.open:
            return
        self.handed += 1
        framer = self._framer
        if framer is not None:  # _wire, inlined: the one hot path (a call costs ~130 ns)
            frame = framer.chunked if frame is framer.frame else framer(frame)
        self._emit(frame, 1)

    def replay(self, frames: list[bytes]) -> None:
        """Write what a resuming client missed, as one write, before any live message.

        Its size was bounded by the caller; it goes to the transport whole (which
        pauses this writer if it must), not into the held-back queue.
        """
        if not self.open or not frames:
            return
        self.handed += len(frames)
        data = self._wire(b"".join(frames))
        if self._h2 is not None:
            # Bounded by the caller, like what HTTP/1.1's transport takes whole.
            self._h2.exempt(len(data))
        self._emit(data, len(frames))

    @property
    def coalescing(self) -> bool:
        """Whether this writer holds every message for the batcher's tick."""
        return self._coalesce

    def coalesce(self, on: bool) -> None:
        """Hold every message for the batcher's tick from now on (C{on}), or write each
        at once again (what is held goes first). Without a batcher, nothing to do."""
        if self._batcher is None or on is self._coalesce:
            return
        if not on:
            self.flush_batch()
        self._coalesce = on

    def _emit(self, data: bytes, msgs: int = 0) -> None:
        """Write wire bytes now, or at the batcher's flush, or hold them while paused;
        C{msgs} is how many messages they carry (0 for a keepalive or a hint)."""
        if self._paused:
            if self._batch:
                # Behind what the batcher holds: its flush passes it all on in order.
                self._batch.append(data)
                self._batch_msgs += msgs
                self._batch_bytes += len(data)
                if self._held_bytes() > self._limit:
                    self.drop()
            else:
                self._hold(data, msgs)
            return
        batcher = self._batcher
        if batcher is not None:
            if self._coalesce:
                self._hold_for_tick(batcher, data, msgs)
                return
            current = batcher.round
            if current & 1:
                if self._round == current:
                    self._batch_up(batcher, data, msgs)
                    return
                self._round = current
        self._out(data)

    def _batch_up(self, batcher: Batcher, data: bytes, msgs: int) -> None:
        """Hold C{data} (C{msgs} messages) for the end of C{batcher}'s round (the read
        in progress: at most what one read brings)."""
        batch = self._batch
        if not batch:
            batcher.enlist(self)
        batch.append(data)
        self._batch_msgs += msgs

    def _hold_for_tick(self, batcher: Batcher, data: bytes, msgs: int) -> None:
        """Hold C{data} (C{msgs} messages) for C{batcher}'s tick, counted toward the
        bound. Held past the bound, they go at once: a stream that reads is never
        dropped for what it was not sent yet."""
        batch = self._batch
        if not batch:
            batcher.hold(self)
        batch.append(data)
        self._batch_msgs += msgs
        self._batch_bytes += len(data)
        if self._batch_bytes > self._limit:
            self.flush_batch()

    def _held_bytes(self) -> int:
        """What this writer holds (for the tick and for a client not reading) and,
        over HTTP/2, what Twisted holds for it: what counts toward the bound."""
        held = self._backlog_bytes + self._batch_bytes
        if self._h2 is not None:
            held += self._h2.counted()
        return held

    def _hold(self, data: bytes, msgs: int) -> None:
        if self._backlog is None:
            self._backlog = deque()
        self._backlog.append((data, msgs))
        self._backlog_bytes += len(data)
        self._backlog_msgs += msgs
        if self._held_bytes() > self._limit:
            self.drop()

    def _h2_write(self, data: bytes) -> None:
        """Over HTTP/2: write through the request (into Twisted's queue for the stream)
        and note it; drop the client once what waits there and what this writer holds
        pass the bound (Twisted would not have paused us for a full socket)."""
        self._request.write(data)
        h2 = self._h2
        if h2 is None or not data:
            return
        h2.wrote(len(data),
                 self.handed - self.discarded - self._batch_msgs - self._backlog_msgs)
        if self.drops and h2.counted() + self._backlog_bytes + self._batch_bytes > self._limit:
            self.drop()

    def flush_batch(self) -> None:
        """Write what the batcher held for this stream, in one write."""
        batch = self._batch
        if not batch:
            return
        self._batch = []
        msgs, self._batch_msgs = self._batch_msgs, 0
        self._batch_bytes = 0
        if not self.open:
            self.discarded += msgs
            return
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        if self._paused:
            self._hold(data, msgs)
        else:
            self._out(data)

    def summary(self, frame: bytes, counts: dict[str, int]) -> None:
        """Write a score summary: a writer that does not conflate writes it as any
        message (only /eps's L{SummaryWriter} gets summaries in the daemon)."""
        self.message(frame)

    def tally(self, counts: dict[str, int]) -> None:
        """Add what this writer wrote, discarded and conflated to C{counts} (the hub's
        totals: keys C{written}, C{discarded}, C{conflated})."""
        counts["written"] += self.written
        counts["discarded"] += self.discarded

    def keepalive(self, frame: bytes, tick: int, idle_ticks: int) -> None:
        """Keepalive tick number C{tick}: write the comment C{frame} if nothing went
        out for C{idle_ticks} ticks. A stream that carries messages needs none.

        What was written is noticed at the next tick, so a stream written to just
        after tick M gets its keepalive at tick M + 1 + C{idle_ticks} at the latest:
        with C{idle_ticks} one less than the ticks per keepalive interval, no stream
        goes longer than the interval without a byte, and the hot path pays nothing.
        """
        if self.handed != self._idle_mark:
            self._idle_mark = self.handed
            self._active_tick = tick
        elif tick - self._active_tick >= idle_ticks:
            self.control(frame)
            self._active_tick = tick

    def control(self, frame: bytes) -> None:
        """Write bytes that are not a message (keepalive); skipped while backed up,
        since a backed-up connection is not idle."""
        if self.open and not self._paused:
            self._emit(self._wire(frame))

    def close(self, hang_up: bool = False) -> None:
        """End the response from the server side (the client sees the stream end);
        with C{hang_up}, close the connection too once the end is sent."""
        if self.open:
            # What is held back goes out before the end of the response: the
            # transport buffers it (at most max_queue) and sends it as the client reads.
            # Over HTTP/2 it is counted as written once in Twisted's queue, as over
            # HTTP/1.1 once in the transport's.
            self._forget_h2()
            self.flush_batch()
            self._flush(force=True)
            self.open = False
            self._release()
            self._request.finish()
            transport = self._connection()
            if hang_up and transport is not None:
                transport.loseConnection()

    def drop(self) -> None:
        """Abort the connection of a client that does not keep up, freeing its buffers."""
        if self.open:
            self.open = False
            self.dropped = True
            self._discard()
            transport = self._connection()
            if transport is not None:
                transport.abortConnection()
                if is_h2_stream(transport):
                    # Twisted resets the HTTP/2 stream and forgets it without telling
                    # the request, whose notifyFinish would then never fire: the stream
                    # would stay in the hub for good.
                    transport.connectionLost(Failure(ConnectionAborted(
                        "dropped for not reading")))

    def lost(self) -> None:
        """Note that the response is over, whoever ended it."""
        self.open = False
        self._discard()
        self._release()

    def _connection(self) -> Any:
        """What to close or abort: the TCP (or TLS) connection of an HTTP/1.x response;
        over HTTP/2 the request's stream (a reset of it, not of the connection)."""
        request = self._request
        return getattr(request, "transport", None) or getattr(request, "channel", None)

    def _discard(self) -> None:
        """Forget what is held: the connection is gone, or going for not reading (over
        HTTP/2 what waits in Twisted's queue for the stream goes with it)."""
        h2 = self._h2
        if h2 is not None:
            self.discarded += h2.unsent_messages()
            self._forget_h2()
        self.discarded += self._backlog_msgs + self._batch_msgs
        self._backlog = None
        self._backlog_bytes = 0
        self._backlog_msgs = 0
        self._batch = []
        self._batch_msgs = 0
        self._batch_bytes = 0

    def _forget_h2(self) -> None:
        """Stop following Twisted's queue (and let it go: Twisted frees it)."""
        if self._h2 is not None:
            self._h2 = None
            self._out = self._request.write

    def _release(self) -> None:
        """Stop being the response's producer (it must not end with one registered)."""
        request = self._request
        if request.producer is self and getattr(request, "channel", None) is not None:
            request.unregisterProducer()

    # IPushProducer: called by the transport as its buffer fills and drains.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        self.open = False

    def _flush(self, force: bool = False) -> None:
        """Write what is held back while the client takes it (all of it if C{force})."""
        backlog = self._backlog
        while backlog and (force or not self._paused) and self.open:
            data, msgs = backlog.popleft()
            self._backlog_bytes -= len(data)
            self._backlog_msgs -= msgs
            self._out(data)



class SummaryWriter(Writer):
    """The /eps stream's writer: never drops its client for being slow, conflates.

    While paused, summaries merge into one pending summary (counts added per ID),
    sent as one message once the client drains.
    """

    __slots__ = ("_pending", "_pending_id", "conflated")

    drops = False

    def __init__(self, request: Request, **kwargs: Any) -> None:
        super().__init__(request, **kwargs)
        self._pending: dict[str, int] | None = None
        # The id: line of the newest summary merged into the pending one (with IDs).
        self._pending_id = b""
        #: Summaries merged into another rather than written as their own message.
        self.conflated = 0

    def summary(self, frame: bytes, counts: dict[str, int]) -> None:
        """Write the summary, or fold C{counts} into the pending one while paused."""
        if not self.open:
            return
        h2 = self._h2
        backed_up = self._paused or (h2 is not None and h2.size() >= TRANSPORT_BUFFER)
        if not backed_up and self._pending is None:
            self.message(frame)
            return
        pending = self._pending
        if pending is None:
            self._pending = dict(counts)
        else:
            self.conflated += 1
            for emoji_id, n in counts.items():
                pending[emoji_id] = pending.get(emoji_id, 0) + n
        self._pending_id = id_line_of(frame)
        if not backed_up:
            self._flush()

    def tally(self, counts: dict[str, int]) -> None:
        super().tally(counts)
        counts["conflated"] += self.conflated

    def keepalive(self, frame: bytes, tick: int, idle_ticks: int) -> None:
        """Also send the pending summary once the client has taken what was queued:
        over HTTP/2 nothing resumes this writer when Twisted's queue drains, so a
        summary held for it goes with the next summary, or at the latest here."""
        if self._pending is not None and not self.backed_up:
            self._flush()
        super().keepalive(frame, tick, idle_ticks)

    def _flush(self, force: bool = False) -> None:
        super()._flush(force)
        if self._pending is not None and (force or not self._paused) and self.open:
            pending, self._pending = self._pending, None
            self.handed += 1
            self._out(self._wire(summary_frame(pending, self._pending_id)))


def writer_for(kind: str, request: Request, *, max_queue: int, batcher: Batcher | None,
               framer: ChunkFramer | None) -> Writer:
    """The writer a stream of C{kind} gets: /eps conflates its summaries
    (L{SummaryWriter}), every other stream drops a client that stops reading."""
    writer_class = SummaryWriter if kind == Kind.EPS else Writer
    return writer_class(request, max_queue=max_queue, batcher=batcher, framer=framer)
