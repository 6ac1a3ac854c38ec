"""Deferreds waiting for one thing to happen: written once, used wherever a caller
may ask "tell me when" before it has (a port listening, a build or a read done, a
connection up, a worker ready)."""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class Waiters(Generic[T]):
    """The Deferreds handed out by L{wait} since the last L{fire} or L{fail}.

    Each of them fires once, with the value (or failure) of the first L{fire} (or
    L{fail}) after it was handed out. A callback that waits again gets a new Deferred
    for the next time, not one fired by the call under way.
    """

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: list[Deferred[T]] = []

    def wait(self) -> Deferred[T]:
        """A new Deferred that fires at the next L{fire} or L{fail}."""
        d: Deferred[T] = Deferred()
        self._waiting.append(d)
        return d

    def fire(self, value: T) -> None:
        """Fire every Deferred waiting now with C{value}."""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(value)

    def fail(self, reason: Failure | BaseException) -> None:
        """Fail every Deferred waiting now with C{reason} (an exception: each its own
        L{Failure} of it)."""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(reason if isinstance(reason, Failure) else Failure(reason))

    def __len__(self) -> int:
        """How many Deferreds wait."""
        return len(self._waiting)
