"""A client's subscription: what it listens to, who it is, what status shows of it,
and the writer (L{emojistream.writers}) that gets its messages onto the wire.

The hub finds streams by namespace and calls L{Stream.send} (or, on /eps,
L{Stream.send_summary}); those are the writer's own methods, so a delivery costs no
extra call. What happens to a message for a client that stopped reading is the
writer's business: L{emojistream.writers.Writer} drops such a client,
L{emojistream.writers.SummaryWriter} conflates its summaries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.web.server import Request

from emojistream.writers import Batcher, ChunkFramer, SummaryWriter, Writer

__all__ = ["Batcher", "Stream", "SummaryStream"]


class Stream:
    """One event stream: its namespace and kind, its client, and its writer."""

    __slots__ = (
        "_described",
        "client_ip",
        "created_at",
        "expiry",
        "keepalive",
        "kind",
        "namespace",
        "request_path",
        "send",
        "send_control",
        "tag",
        "user_agent",
        "writer",
    )

    #: The writer a stream of this class gets.
    writer_class: type[Writer] = Writer

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
        batcher: Batcher | None = None,
        framer: ChunkFramer | None = None,
    ) -> None:
        self.namespace = namespace
        self.kind = kind
        self.request_path = request_path
        self.created_at = created_at
        self.client_ip = client_ip
        self.user_agent = user_agent
        self.tag = tag
        #: The forced-refresh close, pending while the stream is open.
        self.expiry: IDelayedCall | None = None
        # What status.json says of this stream that never changes, encoded once.
        self._described: bytes | None = None
        self.writer = writer = self.writer_class(request, max_queue=max_queue,
                                                 batcher=batcher, framer=framer)
        #: Write one encoded message (the writer's, called by the hub per delivery).
        self.send: Callable[[bytes], None] = writer.message
        #: Write bytes that are not a message (a retry hint, a keepalive).
        self.send_control: Callable[[bytes], None] = writer.control
        #: Keepalive tick C{(frame, tick, idle_ticks)}: see L{Writer.keepalive}.
        self.keepalive: Callable[[bytes, int, int], None] = writer.keepalive

    # What the writer knows, as the hub, the routes and status read it.

    @property
    def msgs_sent(self) -> int:
        """Messages handed to this stream to write."""
        return self.writer.handed

    @property
    def written(self) -> int:
        """Messages written to the client's connection."""
        return self.writer.written

    @property
    def discarded(self) -> int:
        """Messages never written: held when the connection ended."""
        return self.writer.discarded

    @property
    def dropped(self) -> bool:
        """Whether the server dropped this client for not keeping up."""
        return self.writer.dropped

    @property
    def open(self) -> bool:
        return self.writer.open

    @property
    def backed_up(self) -> bool:
        return self.writer.backed_up

    @property
    def queued(self) -> int:
        return self.writer.queued

    def start(self, first: bytes = b"") -> None:
        """Send the response head and C{first} now, before any event."""
        self.writer.start(first)

    def when_finished(self) -> Deferred[None]:
        """A Deferred that fires once the response is over, whoever ended it."""
        return self.writer.when_finished()

    def close(self, hang_up: bool = False) -> None:
        """End the response from the server side (with C{hang_up}, the connection)."""
        self.writer.close(hang_up)

    def drop(self) -> None:
        """Abort the connection of a client that does not keep up."""
        self.writer.drop()

    def lost(self) -> None:
        """Note that the response is over, whoever ended it."""
        self.writer.lost()

    def describe_json(self, now: float) -> bytes:
        """L{describe} as compact JSON, the fixed fields encoded once per stream: the
        status of 10,000 streams is built in a few milliseconds, not tens."""
        fixed = self._described
        if fixed is None:
            fixed = self._described = json.dumps({
                "request_path": self.request_path, "namespace": self.namespace,
                "tag": self.tag, "created_at": int(self.created_at),
                "client_ip": self.client_ip, "user_agent": self.user_agent,
            }, separators=(",", ":")).encode()[:-1]
        return b'%s,"age":%d,"msgs_sent":%d}' % (fixed, int(now - self.created_at),
                                                  self.writer.handed)

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
            "msgs_sent": self.writer.handed,
        }


class SummaryStream(Stream):
    """The /eps stream: its writer conflates summaries instead of dropping the client."""

    __slots__ = ("send_summary",)

    writer_class = SummaryWriter

    def __init__(self, request: Request, **kwargs: Any) -> None:
        super().__init__(request, **kwargs)
        writer = self.writer
        assert isinstance(writer, SummaryWriter)
        #: Write a summary, or fold its counts into the pending one while backed up.
        self.send_summary: Callable[[bytes, dict[str, int]], None] = writer.summary

    @property
    def conflated(self) -> int:
        """Summaries merged into another rather than written as their own message."""
        writer = self.writer
        assert isinstance(writer, SummaryWriter)
        return writer.conflated
