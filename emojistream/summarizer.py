"""The score rollup: per-hit score IDs in, one compact JSON summary per tick out."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from emojistream.sse import encode_event

#: Ticks per second: summaries are sent at most this often.
RATE = 60


def summary_frame(counts: Mapping[str, int]) -> bytes:
    """The SSE message for a summary: C{data:{"2665":3,"1F602":1}} (compact JSON)."""
    text = json.dumps(counts, separators=(",", ":"), ensure_ascii=False)
    return encode_event(text.encode("utf-8"))


class ScoreSummarizer:
    """Counts hits per emoji ID between ticks and hands each non-empty count on.

    C{tick} is driven by a timer (a C{TimerService} at 1/60 s in the daemon, a
    C{Clock} in tests). Everything runs on the reactor thread, so swapping the
    counter at a tick loses and double-counts nothing. C{emit} gets the counts and
    their encoded SSE message (encoded once, for every client).
    """

    def __init__(self, emit: Callable[[dict[str, int], bytes], object]) -> None:
        self._emit = emit
        self._counts: dict[str, int] = {}

    def hit(self, emoji_id: str) -> None:
        """Count one hit for C{emoji_id}."""
        counts = self._counts
        counts[emoji_id] = counts.get(emoji_id, 0) + 1

    def pending(self) -> dict[str, int]:
        """The counts gathered since the last tick (a copy)."""
        return dict(self._counts)

    def tick(self) -> None:
        """Emit the hits since the last tick; nothing if there were none."""
        if not self._counts:
            return
        counts, self._counts = self._counts, {}
        self._emit(counts, summary_frame(counts))
