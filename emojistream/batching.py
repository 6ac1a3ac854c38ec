"""How a read from Redis becomes one write per client: the write round.

Writers hold what they are sent during a round and enlist with the L{Batcher}; its
flush (at the end of the read, or with C{--batch-writes} at the tick) has each write
what it holds at once.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Batched", "Batcher"]


class Batched(Protocol):
    """A writer that holds what it is sent for a L{Batcher}'s flush."""

    def flush_batch(self) -> None:
        """Write what it holds for the batcher, as one write."""


class Batcher:
    """Collects what streams are sent and writes each stream's share as one write.

    Always on for reads from Redis (a I{round}): within one read, a stream's first
    message goes out at once and any later ones wait for the end of the read, so a
    read that brings a backlog of N messages costs each client one or two sends, not
    N. With C{hold_all} (the latency budget, C{--batch-writes}) every write waits for
    the next C{flush}, driven by the 1/60 s tick.
    """

    def __init__(self, hold_all: bool = False) -> None:
        self.hold_all = hold_all
        #: Odd while a round is in progress; a stream that has written in this
        #: round holds its value.
        self.round = 0
        self._dirty: list[Batched] = []

    def enlist(self, writer: Batched) -> None:
        """C{writer} has started holding data: flush it at the next L{flush} (a writer
        holds its data itself, and enlists once per flush)."""
        self._dirty.append(writer)

    def begin_round(self) -> None:
        """A read from Redis starts: streams' second and later writes are held."""
        self.round = (self.round | 1) + 2

    def end_round(self) -> None:
        """The read is handled: write what it held (unless the tick does)."""
        if self.round & 1:
            self.round += 1
        if not self.hold_all:
            self.flush()

    def flush(self) -> None:
        """Write every writer's held data, one write per writer."""
        dirty, self._dirty = self._dirty, []
        for writer in dirty:
            writer.flush_batch()
