"""The hub: connections indexed by namespace, grouped in pools, and broadcast.

A namespace is the request path after C{/subscribe}: C{/eps}, C{/raw},
C{/details/2665}. A message published to a namespace reaches every connection whose
namespace is that one or an ancestor of it at a C{/} boundary, so C{/details} hears
every detail update and C{/details/26} does not hear C{/details/2665}. Matching
connections are found through the index, never by scanning every connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from emojistream.batching import Coalescing
from emojistream.slices import each_slice, slice_per_turn
from emojistream.stream import Stream
from emojistream.vocabulary import POOLS, lineage

#: Keepalive ticks per keepalive interval: the finer, the closer an idle stream's
#: keepalives come to one per interval (here one per 4/5 of it), never more apart.
KEEPALIVE_TICKS = 5


class _Pool(dict[Stream, None]):
    """The streams of one namespace (insertion-ordered), with the messages published
    to them since the last decision of the write policy, and whether they coalesce.
    Every stream of a pool hears the same messages: the pool's count is each one's
    own rate, counted once per message rather than once per delivery."""

    __slots__ = ("coalescing", "heard")

    def __init__(self) -> None:
        super().__init__()
        self.heard = 0
        self.coalescing = False


class Hub:
    """Every open stream, by namespace, and the counters reports read.

    With a C{clock}, a score summary goes out in slices of C{summary_slice} streams,
    one per reactor turn (a C{Cooperator} scheduled on C{clock}): thousands of /eps
    clients would otherwise hold the reactor for tens of milliseconds per tick while
    detail updates wait behind them.

    With C{coalescing} (the adaptive write policy) it decides, every C{window} ticks
    (L{pace}), which namespaces' streams hear so many messages that they coalesce them
    into one write per tick, and tells their writers (L{Stream.coalesce}).
    """

    def __init__(self, clock: IReactorTime | None = None, summary_slice: int = 256,
                 coalescing: Coalescing | None = None) -> None:
        self._summary_slice = summary_slice
        self._turns = None if clock is None else slice_per_turn(clock)
        self._coalescing = coalescing
        self._ticks = 0
        self._index: dict[str, _Pool] = {}
        self._lineages: dict[str, list[str]] = {}
        self._pool_sizes: dict[str, int] = dict.fromkeys(POOLS, 0)
        self._per_ip: dict[str, int] = {}
        self._keepalive_tick = 0
        # What streams that have ended wrote, merged and discarded (open streams
        # keep their own counts: see delivered, conflated, discarded).
        self._ended = {"written": 0, "conflated": 0, "discarded": 0}
        #: Streams that have ended since start, for whatever reason.
        self.closed = 0
        #: Streams the server ended because the client could not keep up.
        self.dropped = 0

    def add(self, stream: Stream) -> None:
        """Start delivering to C{stream} (coalescing, if its namespace's streams do)."""
        pool = self._index.get(stream.namespace)
        if pool is None:
            pool = self._index[stream.namespace] = _Pool()
        pool[stream] = None
        if pool.coalescing:
            stream.coalesce(True)
        self._pool_sizes[stream.kind] = self._pool_sizes.get(stream.kind, 0) + 1
        self._per_ip[stream.client_ip] = self._per_ip.get(stream.client_ip, 0) + 1

    def remove(self, stream: Stream) -> None:
        """Stop delivering to C{stream} at once; removing twice is harmless."""
        pool = self._index.get(stream.namespace)
        if pool is None or stream not in pool:
            return
        del pool[stream]
        if not pool:
            del self._index[stream.namespace]
        self._pool_sizes[stream.kind] -= 1
        left = self._per_ip[stream.client_ip] - 1
        if left:
            self._per_ip[stream.client_ip] = left
        else:
            del self._per_ip[stream.client_ip]
        self.closed += 1
        if stream.dropped:
            self.dropped += 1
        stream.tally(self._ended)

    def message_counts(self) -> dict[str, int]:
        """Since start: messages written to clients (one per message per client), score
        summaries merged into another for a backed-up client instead of written, and
        messages discarded unwritten when their connection ended."""
        counts = dict(self._ended)
        for stream in self.streams():
            stream.tally(counts)
        return counts

    def publish(self, namespace: str, frame: bytes) -> int:
        """Write the one encoded C{frame} to every stream listening on C{namespace}.

        Returns how many streams it was written to.
        """
        chain = self._lineages.get(namespace)
        if chain is None:
            chain = lineage(namespace)
            if len(self._lineages) < 10_000:
                self._lineages[namespace] = chain
        sent = 0
        index = self._index
        for name in chain:
            pool = index.get(name)
            if pool:
                pool.heard += 1
                # A copy: a write may end a stream and so change the pool.
                targets = tuple(pool)
                for stream in targets:
                    stream.send(frame)
                sent += len(targets)
        return sent

    def publish_summary(self, namespace: str, frame: bytes, counts: dict[str, int]
                        ) -> Deferred[None] | None:
        """Send a score summary to the summary streams of C{namespace} (/eps).

        A backed-up summary stream folds C{counts} into its pending summary instead
        of queueing C{frame}. Returns None when the summary is all out, or a Deferred
        that fires once the last slice is: the first slice goes now, each further one
        on a later reactor turn.
        """
        pool = self._index.get(namespace)
        if not pool:
            return None
        targets = tuple(pool)

        def send(some: Sequence[Stream]) -> None:
            for stream in some:
                stream.send_summary(frame, counts)

        return each_slice(targets, self._summary_slice, send, self._turns)

    def pace(self) -> None:
        """One score tick: at the end of each window of ticks, with C{coalescing},
        decide for each namespace whether its streams coalesce over the next one from
        the messages they heard over the last, and tell those that change. Called
        after the tick's flush, when no stream holds anything for the tick."""
        coalescing = self._coalescing
        if coalescing is None:
            return
        self._ticks += 1
        if self._ticks < coalescing.window:
            return
        self._ticks = 0
        decide = coalescing.coalesce
        for pool in tuple(self._index.values()):
            on = decide(pool.heard, pool.coalescing)
            pool.heard = 0
            if on is not pool.coalescing:
                pool.coalescing = on
                for stream in tuple(pool):
                    stream.coalesce(on)

    def from_ip(self, client_ip: str) -> int:
        """How many open streams C{client_ip} holds."""
        return self._per_ip.get(client_ip, 0)

    def keepalive(self, frame: bytes) -> None:
        """One keepalive tick (L{KEEPALIVE_TICKS} per keepalive interval): write a
        keepalive comment to every open stream that has been idle long enough that
        it would otherwise go a whole interval without a byte."""
        self._keepalive_tick += 1
        tick, idle = self._keepalive_tick, KEEPALIVE_TICKS - 1
        for pool in tuple(self._index.values()):
            for stream in tuple(pool):
                stream.keepalive(frame, tick, idle)

    def streams(self) -> Iterator[Stream]:
        """Every open stream, in no particular order."""
        for pool in tuple(self._index.values()):
            yield from tuple(pool)

    def in_namespace(self, namespace: str) -> list[Stream]:
        """The streams subscribed to exactly C{namespace}."""
        return list(self._index.get(namespace, ()))

    def pool_sizes(self) -> dict[str, int]:
        """How many streams each pool (eps, raw, detail, kiosk) holds now."""
        return dict(self._pool_sizes)

    def __len__(self) -> int:
        return sum(self._pool_sizes.values())

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Every connection as the status report lists it, oldest first (parsed from
        each stream's own C{describe_json}: the schema is written once)."""
        streams = sorted(self.streams(), key=lambda s: s.created_at)
        return list(json.loads(b"[%s]" % b",".join(s.describe_json(now) for s in streams)))
