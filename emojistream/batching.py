"""How messages become fewer writes: the write round, the tick, and which streams
wait for the tick (the write policy).

Writers hold what they are sent and enlist with the L{Batcher}; its flushes have each
write what it holds at once: at the end of a read from Redis (the round), and at the
1/60 s tick for a stream that coalesces. L{Coalescing} decides, from how many messages
a stream hears per tick, which streams coalesce under the adaptive write policy.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ADAPTIVE", "BATCH", "DIRECT", "WRITE_POLICIES", "Batched", "Batcher",
           "Coalescing"]

#: Write policies (C{--write-policy}): a stream coalesces by its own rate (ADAPTIVE),
#: never (DIRECT: each message at once, a read's later ones at its end), or always
#: (BATCH: every stream's messages wait for the tick, the old C{--batch-writes}).
ADAPTIVE, DIRECT, BATCH = "adaptive", "direct", "batch"
WRITE_POLICIES = (ADAPTIVE, DIRECT, BATCH)


class Batched(Protocol):
    """A writer that holds what it is sent for a L{Batcher}'s flush."""

    def flush_batch(self) -> None:
        """Write what it holds for the batcher, as one write."""


class Batcher:
    """Collects what streams are sent and writes each stream's share as one write.

    Always on for reads from Redis (a I{round}): within one read, a stream's first
    message goes out at once and any later ones wait for the end of the read, so a
    read that brings a backlog of N messages costs each client one or two sends, not
    N. A stream that coalesces (L{hold}: a fast stream under the adaptive policy,
    every stream with C{hold_all}, C{--write-policy batch}) holds everything until the
    next L{flush}, driven by the 1/60 s tick.
    """

    def __init__(self, hold_all: bool = False) -> None:
        #: Every stream coalesces from its start (the batch policy).
        self.hold_all = hold_all
        #: Odd while a round is in progress; a stream that has written in this
        #: round holds its value.
        self.round = 0
        self._dirty: list[Batched] = []
        self._held: list[Batched] = []

    def enlist(self, writer: Batched) -> None:
        """C{writer} has started holding data for the end of the round: flush it then
        (a writer holds its data itself, and enlists once per flush)."""
        self._dirty.append(writer)

    def hold(self, writer: Batched) -> None:
        """C{writer}, which coalesces, has started holding data: flush it at the next
        tick's L{flush}, not at the end of the round."""
        self._held.append(writer)

    def begin_round(self) -> None:
        """A read from Redis starts: streams' second and later writes are held."""
        self.round = (self.round | 1) + 2

    def end_round(self) -> None:
        """The read is handled: write what it held for its end."""
        if self.round & 1:
            self.round += 1
        dirty, self._dirty = self._dirty, []
        for writer in dirty:
            writer.flush_batch()

    def flush(self) -> None:
        """The tick: write every writer's held data, one write per writer."""
        dirty, self._dirty = self._dirty + self._held, []
        self._held = []
        for writer in dirty:
            writer.flush_batch()


class Coalescing:
    """When a stream coalesces under the adaptive policy: from the messages it heard
    over a window of C{window} ticks, with hysteresis.

    A stream that hears λ messages per tick, each written at once, makes λ sends per
    tick; coalesced, one whenever it heard any (1 - e^-λ for Poisson arrivals), at
    the price of up to one tick's wait. It starts coalescing at C{on} messages per
    tick on average (2.5: 150/s at 60 ticks/s, where coalescing saves 63 % of its
    sends), and stops below C{off} (1.5: 90/s, where it would save under 48 %): a
    stream at about the tick rate or below (/eps, a detail ID) keeps its messages'
    latency, and one that is many times faster (/raw at 400/s, a burst) pays at most
    a tick for a fraction of the sends. Over half a second (30 ticks) a stream in the
    middle of the band is about two standard deviations of Poisson noise from either
    edge, and one at the busiest detail ID's rate in workload 1 (72/s) six below
    C{on}: noise alone rarely switches a stream.

    Pure: it sees counts of ticks and messages, never a clock.
    """

    def __init__(self, window: int = 30, on: float = 2.5, off: float = 1.5) -> None:
        if not 0 < off <= on:
            raise ValueError("Coalescing needs 0 < off <= on")
        #: Ticks per decision.
        self.window = window
        self._on = on * window
        self._off = off * window

    def coalesce(self, heard: int, coalescing: bool) -> bool:
        """Whether a stream that heard C{heard} messages over the last window, and
        coalesced (C{coalescing}) during it, coalesces over the next."""
        return heard >= (self._off if coalescing else self._on)
