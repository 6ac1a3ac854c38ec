"""The score rollup: per-hit score IDs in, one compact JSON summary per tick out."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from emojistream.sse import encode_event
from emojistream.timers import SafeCall

#: Ticks per second: summaries are sent at most this often.
RATE = 60


def summary_frame(counts: Mapping[str, int], id_line: bytes = b"") -> bytes:
    """The SSE message for a summary: C{data:{"2665":3,"1F602":1}} (compact JSON),
    after C{id_line} (its C{id:} field, with C{--event-ids})."""
    text = json.dumps(counts, separators=(",", ":"), ensure_ascii=False)
    return id_line + encode_event(text.encode("utf-8"))


class ScoreSummarizer:
    """Counts hits per emoji ID between ticks and hands each non-empty count on; the
    one owner of the tick's state.

    C{tick} is driven by a timer (a L{Ticker} at 1/60 s in the daemon, a C{Clock} in
    tests). Everything runs on the reactor thread, so swapping the counter at a tick
    loses and double-counts nothing. C{emit} gets the counts and their encoded SSE
    message (encoded once, for every client, by C{encode}: with event IDs, the
    journal's), and returns a Deferred while the
    summary is still going out (in slices): a tick that comes meanwhile adds its
    hits to the next summary, which goes as soon as that one is out.
    """

    def __init__(self, emit: Callable[[dict[str, int], bytes], Deferred[None] | None],
                 encode: Callable[[dict[str, int]], bytes] = summary_frame) -> None:
        self._emit = emit
        self._encode = encode
        self._counts: dict[str, int] = {}
        self._sending = False
        self._owed = False

    def hit(self, emoji_id: str) -> None:
        """Count one hit for C{emoji_id}."""
        counts = self._counts
        counts[emoji_id] = counts.get(emoji_id, 0) + 1

    def pending(self) -> dict[str, int]:
        """The counts gathered since the last tick (a copy)."""
        return dict(self._counts)

    def tick(self) -> None:
        """Emit the hits since the last tick; nothing if there were none."""
        if self._sending:
            self._owed = True
            return
        if not self._counts:
            return
        counts, self._counts = self._counts, {}
        going = self._emit(counts, self._encode(counts))
        if going is not None:
            self._sending = True
            going.addCallback(self._sent)

    def _sent(self, _: object) -> None:
        self._sending = False
        if self._owed:
            self._owed = False
            self.tick()


class Ticker(Service):
    """Calls C{call} every C{interval} seconds of C{clock}, catching up when late.

    A C{LoopingCall} that runs late skips to the next aligned slot, so a busy process
    (a tick that writes to thousands of clients) ticks far below its rate while the
    slots it skipped go unused. Here a late tick is followed by the next one at once,
    and then on schedule again: the rate stays as close to 1/C{interval} as the work
    allows. Exceptions from C{call} are logged; the ticks go on.
    """

    log = Logger()

    def __init__(self, interval: float, call: Callable[[], object], clock: Any,
                 lateness: Callable[[float], None] | None = None) -> None:
        self._interval = interval
        # Told how late each tick runs (seconds), for the tick-lag histogram.
        self._lateness = lateness
        self._call = SafeCall(call, "A tick", self.log)
        self._clock = clock
        self._due = 0.0
        self._pending: Any = None

    def startService(self) -> None:
        super().startService()
        self._due = self._clock.seconds()
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    def _schedule(self) -> None:
        now = self._clock.seconds()
        self._due += self._interval
        if self._due < now - self._interval:
            # More than a tick behind: tick now rather than replay every missed one.
            self._due = now
        self._pending = self._clock.callLater(max(0.0, self._due - now), self._tick)

    def _tick(self) -> None:
        if self._lateness is not None:
            self._lateness(max(0.0, self._clock.seconds() - self._due))
        self._call()
        if self.running:
            self._schedule()
