"""The score rollup: per-hit score IDs in, one compact JSON summary per tick out."""

from __future__ import annotations

import json
from collections.abc import Callable

#: Ticks per second: summaries are sent at most this often.
RATE = 60


class ScoreSummarizer:
    """Counts hits per emoji ID between ticks and hands each non-empty count on.

    C{tick} is driven by a timer (a C{TimerService} at 1/60 s in the daemon, a
    C{Clock} in tests). Everything runs on the reactor thread, so swapping the
    counter at a tick loses and double-counts nothing.
    """

    def __init__(self, emit: Callable[[bytes], object]) -> None:
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
        """Emit C{{"ID":count,...}} for the hits since the last tick; nothing if none."""
        if not self._counts:
            return
        counts, self._counts = self._counts, {}
        summary = json.dumps(counts, separators=(",", ":"), ensure_ascii=False)
        self._emit(summary.encode("utf-8"))
