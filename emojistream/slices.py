"""Long work done a slice per reactor turn, through Twisted's L{Cooperator}: a status
document of 10,000 connections, or a summary for thousands of /eps streams, would
otherwise hold the reactor for tens of milliseconds while every stream waits."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import Cooperator

T = TypeVar("T")


def _one_step() -> bool:
    """Every step ends its turn."""
    return True


def slice_per_turn(clock: IReactorTime) -> Cooperator:
    """A L{Cooperator} that takes one step of one of its tasks (they take turns) per
    turn of C{clock}'s reactor (a C{callLater(0)}), so a step is a slice of work."""

    def schedule(work: Callable[[], None]) -> IDelayedCall:
        return clock.callLater(0, work)

    return Cooperator(terminationPredicateFactory=lambda: _one_step, scheduler=schedule)


def each_slice(items: Sequence[T], size: int, do: Callable[[Sequence[T]], object],
               cooperator: Cooperator | None) -> Deferred[None] | None:
    """Call C{do} with C{items} C{size} at a time, in order: the first slice now, each
    other one step of C{cooperator} later (all now without one).

    Returns None when all is done now, else a Deferred that fires once the last slice
    is done (or fails with what C{do} raised, which ends the work).
    """
    if cooperator is None or len(items) <= size:
        do(items)
        return None
    do(items[:size])

    def rest() -> Iterator[None]:
        for start in range(size, len(items), size):
            if start > size:
                yield None  # the turn ends here; the slice after it is done in the next
            do(items[start:start + size])

    return cooperator.coiterate(rest()).addCallback(lambda _: None)
