"""Waiting Deferreds, written once: each fires once, with the next fire or fail after it
was handed out (pure logic, no reactor)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from emojistream.waiting import Waiters


def results(d: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def test_every_waiter_fires_once_with_the_value():
    waiters: Waiters[int] = Waiters()
    first, second = results(waiters.wait()), results(waiters.wait())
    assert (first, second, len(waiters)) == ([], [], 2)
    waiters.fire(7)
    waiters.fire(8)  # nobody waits any more: nothing fires twice
    assert (first, second, len(waiters)) == ([7], [7], 0)


def test_a_waiter_added_by_a_callback_waits_for_the_next_fire():
    waiters: Waiters[int] = Waiters()
    later: list[list[Any]] = []
    waiters.wait().addCallback(lambda _: later.append(results(waiters.wait())))
    waiters.fire(1)
    assert later == [[]] and len(waiters) == 1
    waiters.fire(2)
    assert later == [[2]]


def test_fail_fails_every_waiter_with_the_reason():
    waiters: Waiters[int] = Waiters()
    seen = [results(waiters.wait()) for _ in range(2)]
    waiters.fail(ValueError("no"))
    for outcome in seen:
        [failure] = outcome
        assert failure.check(ValueError) and failure.getErrorMessage() == "no"
        failure.trap(ValueError)
    assert len(waiters) == 0


def test_a_cancelled_waiter_does_not_stop_the_others():
    waiters: Waiters[int] = Waiters()
    cancelled = waiters.wait()
    cancelled.addErrback(lambda f: None)
    cancelled.cancel()
    other = results(waiters.wait())
    waiters.fire(3)
    assert other == [3]


def test_a_raising_callback_does_not_stop_the_others():
    waiters: Waiters[int] = Waiters()
    raising = waiters.wait()
    raising.addCallback(lambda _: 1 / 0)
    other = results(waiters.wait())
    waiters.fire(4)
    assert other == [4]
    [failure] = results(raising)
    assert failure.check(ZeroDivisionError)
