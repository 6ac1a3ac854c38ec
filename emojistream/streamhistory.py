"""What a resume reads from the shared history when the node's memory cannot fill it
(L{emojistream.history.HistoryReader} over Redis): C{XRANGE} in pages, a few fetches
at a time, so that a reconnect storm can neither hammer Redis nor stall the reactor.
A fetch whose connection is down (Redis restarting, the connection killed) waits for
it to come back, a while: the client gets late events, not a gap.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from emojistream.bridge import NotConnected
from emojistream.history import EntryId, decode_entry, entry_of, parse_entry_id, position

#: Entries one XRANGE page brings at most.
PAGE = 1000
#: Fetches reading from Redis at once at most; the others wait their turn, in order.
IN_FLIGHT = 4
#: Fetches waiting at most; more fail at once (L{HistoryBusy}).
MAX_WAITING = 10_000
#: Seconds a fetch waits at most, in all, for its lost connection to come back: a
#: Redis restart and the reconnection's backoff (5 s at most) fit.
RECONNECT_WAIT = 10.0

Entries = list[tuple[int, bytes, bytes]]


class HistoryBusy(Exception):
    """Too many resumes wait to read the stream already: this one is not queued."""


class _Fetch:
    """One resume's read: (after, until], its entries so far, where it is."""

    __slots__ = ("cancelled", "done", "down_since", "entries", "last", "max_entries",
                 "read", "result", "until", "waiting_up")

    def __init__(self, after: int, until: int, max_entries: int) -> None:
        #: The newest entry ID read so far (at first: C{after}'s, which must exist).
        self.last: EntryId = entry_of(after)
        self.until = entry_of(until)
        self.max_entries = max_entries
        #: Entries read after C{after} (emojistream's or not).
        self.read = 0
        self.entries: Entries = []
        self.cancelled = False
        self.done = False
        self.result: Deferred[Entries | None] = Deferred()
        #: When it first found its connection down (None: never).
        self.down_since: float | None = None
        #: While it waits for the connection to come back: the deadline's call.
        self.waiting_up: Any = None


class RedisHistory:
    """L{emojistream.history.HistoryReader} over a kept-up command connection.

    A fetch reads its pages one after the other, one per reactor turn at most
    (L{PAGE} entries each); at most C{in_flight} fetches read at once, the rest wait in
    a first-come, first-served queue of at most C{max_waiting} (past it a fetch fails
    with L{HistoryBusy}). Cancelling a fetch's Deferred (its client went away) takes it
    out of the queue, or stops it after the page in flight.

    @ivar fetches: fetches started since start.
    @ivar pages: XRANGE pages read since start.
    @ivar busy: fetches refused because too many waited.
    """

    def __init__(self, connection: Any, stream_key: str, *, clock: IReactorTime,
                 page: int = PAGE, in_flight: int = IN_FLIGHT,
                 max_waiting: int = MAX_WAITING,
                 reconnect_wait: float = RECONNECT_WAIT) -> None:
        self._connection = connection
        self._key = stream_key
        self._clock = clock
        self._page = page
        self._in_flight = in_flight
        self._max_waiting = max_waiting
        self._reconnect_wait = reconnect_wait
        self._waiting: deque[_Fetch] = deque()
        self._running = 0
        self.fetches = 0
        self.pages = 0
        self.busy = 0

    @property
    def waiting(self) -> int:
        """Fetches waiting for their turn."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Fetches reading now."""
        return self._running

    def entries_after(self, after: int, until: int, max_entries: int
                      ) -> Deferred[Entries | None]:
        """The entries with positions in (C{after}, C{until}], oldest first; None if
        the entry at C{after} is gone (or never was) or more than C{max_entries} lie
        between; a failure if Redis cannot be asked (or L{HistoryBusy})."""
        if until <= after:
            return succeed([])
        if len(self._waiting) >= self._max_waiting:
            self.busy += 1
            return fail(HistoryBusy(f"{len(self._waiting)} resumes wait to read the "
                                    "stream already"))
        fetch = _Fetch(after, until, max_entries)
        fetch.result = Deferred(lambda d: self._cancel(fetch))
        self._waiting.append(fetch)
        self._next()
        return fetch.result

    def _cancel(self, fetch: _Fetch) -> None:
        fetch.cancelled = True
        if fetch in self._waiting:
            self._waiting.remove(fetch)
        elif fetch.waiting_up is not None:
            # Waiting for its connection: it ends now.
            fetch.waiting_up.cancel()
            fetch.waiting_up = None
            self._finish(fetch, None)
        # Else it is reading: it ends after the page in flight.

    def _next(self) -> None:
        while self._waiting and self._running < self._in_flight:
            fetch = self._waiting.popleft()
            self._running += 1
            self.fetches += 1
            self._clock.callLater(0, self._read_page, fetch, True)

    def _finish(self, fetch: _Fetch, outcome: Entries | Failure | None) -> None:
        if fetch.done:
            return
        fetch.done = True
        self._running -= 1
        self._next()
        if fetch.cancelled:
            return
        if isinstance(outcome, Failure):
            fetch.result.errback(outcome)
        else:
            fetch.result.callback(outcome)

    def _read_page(self, fetch: _Fetch, first: bool) -> None:
        if fetch.cancelled:
            self._finish(fetch, None)
            return
        protocol = self._connection.protocol
        if protocol is None:
            self._wait_up(fetch, first)
            return
        # From the last entry read, inclusive (it is dropped): the exclusive form needs
        # Redis 6.2. One more than may be needed, to know when there are too many.
        count = min(self._page, fetch.max_entries - fetch.read + 2)
        d: Deferred[Any] = maybeDeferred(
            protocol.execute_command, "XRANGE", self._key, str(fetch.last),
            str(fetch.until), "COUNT", count)
        d.addCallbacks(self._got_page, self._page_failed,
                       callbackArgs=(fetch, first, count), errbackArgs=(fetch, first))
        d.addErrback(lambda reason: self._finish(fetch, reason))

    def _page_failed(self, reason: Failure, fetch: _Fetch, first: bool) -> None:
        if reason.check(txredisapi.ConnectionError) and not fetch.cancelled:
            # Lost with the connection: the page is read again once it is back.
            self._wait_up(fetch, first)
        else:
            self._finish(fetch, reason)

    def _wait_up(self, fetch: _Fetch, first: bool) -> None:
        """The connection is down: read the page once it is up again, or fail the
        fetch once it has waited L{RECONNECT_WAIT} seconds in all."""
        now = self._clock.seconds()
        if fetch.down_since is None:
            fetch.down_since = now
        left = fetch.down_since + self._reconnect_wait - now
        if left <= 0:
            self._finish(fetch, Failure(NotConnected(
                f"{self._connection.description} is down")))
            return

        def again(_: object = None) -> None:
            if fetch.waiting_up is None:
                return  # already on its way (up, or the deadline), or cancelled
            if fetch.waiting_up.active():
                fetch.waiting_up.cancel()
            fetch.waiting_up = None
            self._read_page(fetch, first)

        fetch.waiting_up = self._clock.callLater(left, again)
        # On a turn of its own: never within this call, whatever the connection says.
        self._connection.when_up().addCallback(
            lambda _: self._clock.callLater(0, again))

    def _got_page(self, reply: Any, fetch: _Fetch, first: bool, count: int) -> None:
        self.pages += 1
        if fetch.cancelled:
            self._finish(fetch, None)
            return
        entries = reply or []
        if first and (not entries or parse_entry_id(entries[0][0]) != fetch.last):
            self._finish(fetch, None)  # trimmed, or it never was
            return
        for raw_id, fields in entries:
            entry = parse_entry_id(raw_id)
            if entry <= fetch.last:
                continue
            fetch.last = entry
            fetch.read += 1
            if fetch.read > fetch.max_entries:
                self._finish(fetch, None)
                return
            try:
                place = position(entry)
                channel, payload = decode_entry(fields)
            except ValueError:
                continue  # not emojistream's: no event of any client
            fetch.entries.append((place, channel, payload))
        if len(entries) < count or fetch.last >= fetch.until:
            self._finish(fetch, fetch.entries)
        else:
            self._clock.callLater(0, self._read_page, fetch, False)
