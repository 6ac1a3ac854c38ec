"""One client's subscription, from the moment the web layer admits it to its end.

The web route (L{emojistream.web.StreamRoutes}) decides whether a request may stream
at all (HEAD, the drain, the limits: refusals and their status codes) and sets the
SSE headers; then it hands the request to a L{Subscription}, which owns the rest:
what a resuming client missed (C{Last-Event-ID}, L{emojistream.replay}), joining the
hub, the forced-refresh expiry, the response head and the replay before any live
event, leaving the hub when the response ends (whoever ends it), and the verbose log.

Pure: it imports no reactor. Its clock (an C{IReactorTime}), hub, journal, batcher
and log are given, so that it runs on a C{Clock} over a C{StringTransport} in tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from emojistream.hub import Hub
from emojistream.replay import EXPIRED, UNAVAILABLE, Journal, Recall, Resume
from emojistream.sse import encode_retry
from emojistream.vocabulary import EPS_NAMESPACE, SCORE_KINDS, SUBSCRIBE

if TYPE_CHECKING:
    # Its writer is made by the web layer (emojistream.writers.writer_for): the
    # subscription only holds it.
    from emojistream.writers import Writer

__all__ = ["Refresh", "Subscription", "last_event_id"]


class Refresh(NamedTuple):
    """Forced refresh (C{--force-refresh}): how long a stream may live, and the
    C{retry:} hint it starts with, for score streams (/eps, /raw) and the others."""

    score_max_age: float
    detail_max_age: float
    score_retry_ms: int
    detail_retry_ms: int

    def of(self, kind: str) -> tuple[float, bytes]:
        """Seconds a stream of C{kind} lives, and the retry hint it starts with."""
        if kind in SCORE_KINDS:
            return self.score_max_age, encode_retry(self.score_retry_ms)
        return self.detail_max_age, encode_retry(self.detail_retry_ms)


def last_event_id(request: Request) -> str | None:
    """The ID a reconnecting client last saw: C{Last-Event-ID}, or for clients that
    cannot set it, C{?last_event_id=} or C{?lastEventID=} (as Mercure's send it)."""
    # The header first: a browser sends it on each reconnect, newer than the URL's.
    last = request.getHeader(b"last-event-id")
    if not last:
        given = request.args.get(b"last_event_id") or request.args.get(b"lastEventID")
        last = given[0] if given else None
    return last.decode("latin-1") if last else None


class Subscription:
    """One admitted event stream: its namespace and client, its writer, and its life
    (L{start}, the expiry, L{close}, the end). It is what the hub indexes: it
    provides L{emojistream.stream.Stream}, its delivery methods being its writer's
    own (an C{Writer}, or on /eps a C{SummaryWriter}, which conflates)."""

    __slots__ = (
        "_clock",
        "_described",
        "_hub",
        "_log",
        "_max_queue",
        "client_ip",
        "coalesce",
        "created_at",
        "expiry",
        "keepalive",
        "kind",
        "namespace",
        "request_path",
        "send",
        "send_control",
        "send_summary",
        "tag",
        "tally",
        "user_agent",
        "writer",
    )

    def __init__(
        self,
        writer: Writer,
        *,
        hub: Hub,
        clock: IReactorTime,
        namespace: str,
        kind: str,
        client_ip: str,
        tag: str | None = None,
        max_queue: int = 1 << 20,
        log: Logger | None = None,
    ) -> None:
        self._hub = hub
        self._clock = clock
        self._log = log
        self._max_queue = max_queue
        self.namespace = namespace
        self.kind = kind
        self.request_path = SUBSCRIBE + namespace
        self.created_at = clock.seconds()
        self.client_ip = client_ip
        request = writer.request
        self.user_agent = (request.getHeader(b"user-agent") or b"").decode("utf-8", "replace")
        self.tag = tag
        #: The forced-refresh close, pending while the stream is open.
        self.expiry: IDelayedCall | None = None
        # What status.json says of this stream that never changes, encoded once.
        self._described: bytes | None = None
        #: How its bytes reach the client (L{emojistream.writers}).
        self.writer = writer
        # The stream's delivery methods are the writer's: no extra call per message.
        self.send: Callable[[bytes], None] = writer.message
        self.send_summary: Callable[[bytes, dict[str, int]], None] = writer.summary
        self.send_control: Callable[[bytes], None] = self.writer.control
        self.keepalive: Callable[[bytes, int, int], None] = self.writer.keepalive
        self.coalesce: Callable[[bool], None] = self.writer.coalesce
        self.tally: Callable[[dict[str, int]], None] = self.writer.tally

    def deliver_through(self, send: Callable[[bytes], None],
                        send_summary: Callable[[bytes, dict[str, int]], None]) -> None:
        """Deliver through C{send} and C{send_summary} instead of the writer's own
        methods (a resume being caught up with: L{_CatchUp}); L{deliver_directly}
        goes back."""
        self.send = send
        self.send_summary = send_summary

    def deliver_directly(self) -> None:
        """Deliver straight through the writer again."""
        self.send = self.writer.message
        self.send_summary = self.writer.summary

    @property
    def dropped(self) -> bool:
        """Whether the server dropped this client for not keeping up."""
        return self.writer.dropped

    def start(self, journal: Journal | None = None, refresh: Refresh | None = None,
              recall: Recall | None = None) -> None:
        """Begin: find what a resuming client missed (with a C{journal}: event IDs),
        join the hub, arm the expiry (with C{refresh}), and send the response head,
        then the missed events, all within this call: before any live event.

        With a stream source, what the journal's memory does not hold is read from
        the stream (C{recall}), and an ID this node has not reached yet is waited for:
        live events are held meanwhile (L{_CatchUp}), never sent twice."""
        writer = self.writer
        request = writer.request
        resume = self._resume(request, journal)
        if resume is not None and resume.fetch is not None and recall is None:
            assert journal is not None
            resume = journal.gap(EXPIRED)
        if resume is not None and resume.gap is not None:
            request.setHeader(b"X-Sse-Gap", resume.gap.encode("ascii"))
        self._hub.add(self)
        request.notifyFinish().addBoth(self._finished)
        first = b""
        if refresh is not None:
            max_age, first = refresh.of(self.kind)
            self.expiry = self._clock.callLater(max_age, self.close)
        writer.start(first)
        if resume is not None:
            if journal is not None and (resume.fetch is not None
                                        or resume.skip_until is not None):
                _CatchUp(self, journal, recall, resume, self._max_queue)
            else:
                writer.replay(resume.frames)
        if self._log is not None:
            self._log.info("connect {path} from {ip}", path=self.request_path,
                           ip=self.client_ip)

    def _resume(self, request: Request, journal: Journal | None) -> Resume | None:
        """With event IDs, what a reconnecting client missed; else None."""
        if journal is None:
            return None
        last = last_event_id(request)
        if last is None:
            return None
        return journal.resume(self.namespace, last, self._max_queue)

    def close(self, hang_up: bool = False) -> None:
        """End the response from the server side (with C{hang_up}, the connection):
        the expiry, a cleanup call, the drain. The end is noted as any end is."""
        self.writer.close(hang_up)

    def _finished(self, result: object) -> None:
        """The response is over, whoever ended it: leave the hub and say so."""
        self.writer.lost()
        expiry = self.expiry
        if expiry is not None and expiry.active():
            expiry.cancel()
        self._hub.remove(self)
        if self._log is not None:
            self._log.info("{what} {path} from {ip} after {age:.1f} s",
                           what="dropped slow" if self.writer.dropped else "disconnect",
                           path=self.request_path, ip=self.client_ip,
                           age=self._clock.seconds() - self.created_at)

    def describe_json(self, now: float) -> bytes:
        """This stream as status.json lists it (see L{emojistream.stream.Stream}), the
        fixed fields encoded once: 10,000 streams' status is built in milliseconds."""
        fixed = self._described
        if fixed is None:
            fixed = self._described = json.dumps({
                "request_path": self.request_path, "namespace": self.namespace,
                "tag": self.tag, "created_at": int(self.created_at),
                "client_ip": self.client_ip, "user_agent": self.user_agent,
            }, separators=(",", ":")).encode()[:-1]
        return b'%s,"age":%d,"msgs_sent":%d}' % (fixed, int(now - self.created_at),
                                                  self.writer.handed)


class _CatchUp:
    """A resume the journal's memory could not fill, with a stream source: live
    events are held (up to C{max_bytes}, else a gap) while what was missed is read
    from the stream, then written after it; or, for an ID this node has not read up
    to yet, live events up to it are left out. Either way none is sent twice and
    none is missed; the subscription's own delivery methods are restored after."""

    def __init__(self, subscription: Subscription, journal: Journal,
                 recall: Recall | None, resume: Resume, max_bytes: int) -> None:
        self._subscription = subscription
        self._writer = subscription.writer
        self._journal = journal
        self._recall = recall
        self._max_bytes = max_bytes
        self._held: list[tuple[bytes, dict[str, int] | None]] = []
        self._held_bytes = 0
        self._done = False
        eps = subscription.namespace == EPS_NAMESPACE
        if resume.fetch is not None:
            after, until = resume.fetch
            self._hold()
            self._read(after, until)
        elif eps:
            # Summaries count hits between this node's ticks: the first one past the
            # ID also counts hits the client has had. Hold them until one is past it,
            # then read the hits between the ID and that one from the stream.
            assert resume.skip_until is not None
            self._skip_until = resume.skip_until
            self._hold(until_past=True)
        else:
            assert resume.skip_until is not None
            self._skip_until = resume.skip_until
            subscription.deliver_through(self._skip, self._writer.summary)

    def _hold(self, until_past: bool = False) -> None:
        self._subscription.deliver_through(
            self._hold_event,
            self._hold_summary_until_past if until_past else self._hold_summary)

    def _restore(self) -> None:
        self._done = True
        self._subscription.deliver_directly()

    def _keep(self, frame: bytes, counts: dict[str, int] | None) -> None:
        if self._done:
            return
        self._held.append((frame, counts))
        self._held_bytes += len(frame)
        if self._held_bytes > self._max_bytes:
            # Too much arrived while reading: give up, as a resume that is too big.
            self._held = []
            self._restore()
            self._writer.replay(self._journal.gap(EXPIRED).frames)

    def _hold_event(self, frame: bytes) -> None:
        self._keep(frame, None)

    def _hold_summary(self, frame: bytes, counts: dict[str, int]) -> None:
        self._keep(frame, counts)

    def _hold_summary_until_past(self, frame: bytes, counts: dict[str, int]) -> None:
        place = self._journal.position_of(frame)
        if place <= self._skip_until:
            return  # its hits are all the client's already
        self._subscription.deliver_through(self._hold_event, self._hold_summary)
        self._keep(frame, counts)
        # This summary is replaced by the stream's count from the ID up to it.
        self._held.pop()
        self._read(self._skip_until, place)

    def _skip(self, frame: bytes) -> None:
        if self._journal.position_of(frame) <= self._skip_until:
            return
        self._restore()
        self._writer.message(frame)

    def _read(self, after: int, until: int) -> None:
        if self._recall is None:
            self._filled(None)
            return
        namespace = self._subscription.namespace
        reading = self._recall.frames(namespace, after, until)
        reading.addCallbacks(self._filled, self._failed)

        def left(result: object) -> object:
            # The client has gone: what it would have been sent need not be read.
            if not reading.called:
                reading.cancel()
            return result

        self._writer.when_finished().addBoth(left)

    def _failed(self, failure: object) -> None:
        self._give_up(UNAVAILABLE)

    def _filled(self, frames: list[bytes] | None) -> None:
        if self._done:
            return
        if frames is None:
            self._give_up(EXPIRED)
            return
        # The bounds of a resume from memory: at most as many events as a namespace
        # keeps, and what may be written at once.
        if (len(frames) > self._journal.max_events
                or sum(len(f) for f in frames) > self._max_bytes):
            self._give_up(EXPIRED)
            return
        self._journal.fetched += 1
        held, self._held = self._held, []
        self._restore()
        writer = self._writer
        writer.replay(frames)
        for frame, counts in held:
            if counts is None:
                writer.message(frame)
            else:
                writer.summary(frame, counts)

    def _give_up(self, reason: str) -> None:
        """The stream could not give what was missed: the gap event (its ID the
        newest this node has read), then live events from there on."""
        if self._done:
            return
        self._held = []
        self._restore()
        self._writer.replay(self._journal.gap(reason).frames)

