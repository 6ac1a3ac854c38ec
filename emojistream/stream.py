"""One client's long-lived SSE response: what it subscribed to, writing to it, closing it.

A client that stops reading must not make the server buffer without bound. The
stream is the transport's push producer: once the transport's buffer is full it
pauses the stream, which then holds further messages itself, up to C{max_queue}
bytes in all. An event stream that passes the bound is dropped (the connection is
aborted, its buffers freed); a summary stream (/eps) instead merges the summaries
that arrive while it is paused into one, so that a client that drains still gets
exact totals, in fewer messages.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

from emojistream.summarizer import summary_frame

#: What a transport buffers before it pauses its producer (Twisted's bufferSize).
TRANSPORT_BUFFER = 65536


@implementer(IPushProducer)
class Stream:
    """A connected EventSource client and the response it is reading.

    The web route hands L{done} to Klein as the response; firing it ends the
    response, and Klein cancels it when the client goes away first.
    """

    __slots__ = (
        "_backlog",
        "_backlog_bytes",
        "_limit",
        "_paused",
        "_request",
        "client_ip",
        "created_at",
        "done",
        "dropped",
        "expiry",
        "kind",
        "msgs_sent",
        "namespace",
        "open",
        "request_path",
        "tag",
        "user_agent",
    )

    def __init__(
        self,
        request: Request,
        *,
        namespace: str,
        kind: str,
        request_path: str,
        created_at: float,
        client_ip: str,
        user_agent: str,
        tag: str | None = None,
        max_queue: int = 1 << 20,
    ) -> None:
        self._request = request
        self.namespace = namespace
        self.kind = kind
        self.request_path = request_path
        self.created_at = created_at
        self.client_ip = client_ip
        self.user_agent = user_agent
        self.tag = tag
        self.msgs_sent = 0
        self.open = True
        #: True once the server dropped this client for not keeping up.
        self.dropped = False
        self.done: Deferred[None] = Deferred()
        #: The forced-refresh close, pending while the stream is open.
        self.expiry: IDelayedCall | None = None
        self._paused = False
        self._backlog: deque[bytes] | None = None
        self._backlog_bytes = 0
        # The transport holds up to TRANSPORT_BUFFER before pausing us; we hold the rest.
        self._limit = max(0, max_queue - TRANSPORT_BUFFER)

    def start(self, first: bytes = b"") -> None:
        """Register as the response's producer and send the status line, headers
        and C{first} (possibly empty) at once, before any event."""
        self._request.registerProducer(self, True)
        self._request.write(first)

    def when_finished(self) -> Deferred[None]:
        """A Deferred that fires once the response is over, whoever ended it."""
        d: Deferred[None] = Deferred()
        self._request.notifyFinish().addBoth(lambda _: d.callback(None))
        return d

    @property
    def backed_up(self) -> bool:
        """Whether the client's transport is full and this stream is holding back."""
        return self._paused

    @property
    def queued(self) -> int:
        """Bytes this stream holds back because the client is not reading."""
        return self._backlog_bytes

    def send(self, frame: bytes) -> None:
        """Write one encoded message (held back while paused); counted in C{msgs_sent}."""
        if not self.open:
            return
        self.msgs_sent += 1
        if not self._paused:
            self._request.write(frame)
            return
        if self._backlog is None:
            self._backlog = deque()
        self._backlog.append(frame)
        self._backlog_bytes += len(frame)
        if self._backlog_bytes > self._limit:
            self.drop()

    def send_control(self, frame: bytes) -> None:
        """Write bytes that are not a message (keepalive); skipped while backed up,
        since a backed-up connection is not idle."""
        if self.open and not self._paused:
            self._request.write(frame)

    def close(self, hang_up: bool = False) -> None:
        """End the response from the server side (the client sees the stream end);
        with C{hang_up}, close the connection too once the end is sent."""
        if self.open:
            self.open = False
            self._release()
            if not self.done.called:
                self.done.callback(None)
            transport = getattr(self._request, "transport", None)
            if hang_up and transport is not None:
                transport.loseConnection()

    def drop(self) -> None:
        """Abort the connection of a client that does not keep up, freeing its buffers."""
        if self.open:
            self.open = False
            self.dropped = True
            self._backlog = None
            self._backlog_bytes = 0
            transport = getattr(self._request, "transport", None)
            if transport is not None:
                transport.abortConnection()

    def lost(self) -> None:
        """Note that the response is over, whoever ended it."""
        self.open = False
        self._backlog = None
        self._backlog_bytes = 0
        self._release()

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

    def _flush(self) -> None:
        backlog = self._backlog
        while backlog and not self._paused and self.open:
            frame = backlog.popleft()
            self._backlog_bytes -= len(frame)
            self._request.write(frame)

    def describe(self, now: float) -> dict[str, Any]:
        """This connection as the admin status report lists it."""
        return {
            "request_path": self.request_path,
            "namespace": self.namespace,
            "tag": self.tag,
            "created_at": int(self.created_at),
            "age": int(now - self.created_at),
            "client_ip": self.client_ip,
            "user_agent": self.user_agent,
            "msgs_sent": self.msgs_sent,
        }


class SummaryStream(Stream):
    """The /eps stream: never dropped for being slow, conflated instead.

    While paused, summaries merge into one pending summary (counts added per ID),
    sent as one message once the client drains.
    """

    __slots__ = ("_pending",)

    def __init__(self, request: Request, **kwargs: Any) -> None:
        super().__init__(request, **kwargs)
        self._pending: dict[str, int] | None = None

    def send_summary(self, frame: bytes, counts: dict[str, int]) -> None:
        """Write the summary, or fold C{counts} into the pending one while paused."""
        if not self.open:
            return
        if not self._paused and self._pending is None:
            self.msgs_sent += 1
            self._request.write(frame)
            return
        pending = self._pending
        if pending is None:
            self._pending = dict(counts)
        else:
            for emoji_id, n in counts.items():
                pending[emoji_id] = pending.get(emoji_id, 0) + n
        if not self._paused:
            self._flush()

    def _flush(self) -> None:
        super()._flush()
        if self._pending is not None and not self._paused and self.open:
            pending, self._pending = self._pending, None
            self.msgs_sent += 1
            self._request.write(summary_frame(pending))
