"""The all-time ranking behind C{GET /api/rankings}: the top of the sorted set
C{emojitrack_score}, which emojitracker's feeder (and C{--demo}'s) increments per hit.

The demo page starts from it and adds C{/eps} on top, as emojitracker's own page does.
One read of Redis serves every request for L{CACHE_SECONDS
<emojistream.cache.CACHE_SECONDS>}, whatever the number of requests and whatever
C{limit} each asks for: the read always takes the top L{MAX_LIMIT}, and each answer is
a slice of it. Each entry is shaped like one of emojitracker's REST API
(C{/v1/rankings}): C{char}, C{id}, C{name}, C{score}.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from emojistream.cache import fresh
from emojistream.vocabulary import ID_PATTERN, SCORE_KEY
from emojistream.waiting import Waiters

#: Entries one answer holds at most (and the default); emojitracker tracks about 850.
MAX_LIMIT = 1000


class RankingsUnavailable(Exception):
    """Redis cannot be read now; the message says why, in one line."""


def parse_limit(given: bytes | None) -> int:
    """The C{limit} query parameter: a whole number from 1 to L{MAX_LIMIT}, by default
    L{MAX_LIMIT}. Raises ValueError for anything else."""
    if given is None:
        return MAX_LIMIT
    if not given.isdigit() or len(given) > 4:
        raise ValueError(given)
    limit = int(given)
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(given)
    return limit


def encode_entries(reply: Sequence[bytes], known: Mapping[str, tuple[str, str]]
                   ) -> list[bytes]:
    """Each ranked entry of a C{ZREVRANGE … WITHSCORES} reply as compact JSON.

    Members that are not valid IDs (as the streams define them) and scores that are
    not finite are skipped: the page shows only what a stream could have carried.
    C{char} and C{name} come from C{known} (ID -> (char, name)), null for others.
    """
    entries = []
    for member, raw_score in zip(reply[::2], reply[1::2], strict=True):
        try:
            emoji_id = member.decode("ascii")
            score = float(raw_score)
        except (UnicodeDecodeError, ValueError):
            continue
        if not ID_PATTERN.fullmatch(emoji_id) or not math.isfinite(score):
            continue
        char, name = known.get(emoji_id, (None, None))
        entries.append(json.dumps({"char": char, "id": emoji_id, "name": name,
                                   "score": int(score)},
                                  ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return entries


class Rankings:
    """Reads the top of L{SCORE_KEY} at most once per L{CACHE_SECONDS
    <emojistream.cache.CACHE_SECONDS>}.

    A read's outcome, the entries or the reason it failed, serves every request of
    its period; requests that come while a read is under way wait for it.

    @ivar connection: the kept Redis connection it reads over (its C{protocol} is
        None while down).
    @param known: ID -> (char, name) of the emoji this daemon knows by name.
    """

    def __init__(self, connection: Any, *, clock: IReactorTime,
                 known: Mapping[str, tuple[str, str]]) -> None:
        self.connection = connection
        self._clock = clock
        self._known = known
        # (when read, the entries or the reason the read failed)
        self._cached: tuple[float, list[bytes] | str] | None = None
        self._waiting: Waiters[list[bytes]] = Waiters()
        self._reading = False
        #: Reads sent to Redis, for tests and tools.
        self.reads = 0

    def top(self, limit: int) -> Deferred[bytes]:
        """The C{limit} best-ranked entries as a JSON array; fails with
        L{RankingsUnavailable} while Redis cannot be read."""
        return self._entries().addCallback(
            lambda entries: b"[" + b",".join(entries[:limit]) + b"]")

    def _entries(self) -> Deferred[list[bytes]]:
        now = self._clock.seconds()
        if self._cached is not None and fresh(self._cached[0], now):
            return self._outcome(self._cached[1])
        if not self._reading:
            protocol = self.connection.protocol
            if protocol is None:
                return fail(RankingsUnavailable(
                    f"Redis is {self.connection.state}: the rankings are unavailable"))
            self._reading = True
            self.reads += 1
            reading: Deferred[list[bytes]] = protocol.execute_command(
                "ZREVRANGE", SCORE_KEY, 0, MAX_LIMIT - 1, "WITHSCORES")
            reading.addCallbacks(self._read, self._failed)
        return self._waiting.wait()

    @staticmethod
    def _outcome(outcome: list[bytes] | str) -> Deferred[list[bytes]]:
        if isinstance(outcome, str):
            return fail(RankingsUnavailable(outcome))
        return succeed(outcome)

    def _read(self, reply: Any) -> None:
        try:
            if not isinstance(reply, list):
                raise ValueError(f"unexpected reply {reply!r:.60}")
            outcome: list[bytes] | str = encode_entries(reply, self._known)
        except ValueError as e:
            outcome = f"reading {SCORE_KEY} failed: {e}"
        self._done(outcome)

    def _failed(self, reason: Failure) -> None:
        self._done(f"reading {SCORE_KEY} failed: {reason.getErrorMessage()}")

    def _done(self, outcome: list[bytes] | str) -> None:
        self._cached = (self._clock.seconds(), outcome)
        self._reading = False
        if isinstance(outcome, str):
            self._waiting.fail(RankingsUnavailable(outcome))
        else:
            self._waiting.fire(outcome)
