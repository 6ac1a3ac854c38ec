"""Work a slice per reactor turn, on a Clock: the shared helper, and the status
document built through it (pure logic, no reactor, no Redis)."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from emojistream.hub import Hub
from emojistream.slices import each_slice, slice_per_turn
from emojistream.status import SLICE, StatusReport


class Turns(Clock):
    """A Clock that also turns like a reactor: L{turn} runs the calls made before it
    (C{advance(0)} would run those they make too)."""

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def test_the_first_slice_goes_now_and_each_other_one_turn_later():
    clock = Turns()
    seen: list[list[int]] = []
    done: list[object] = []
    d = each_slice(list(range(7)), 3, lambda some: seen.append(list(some)),
                   slice_per_turn(clock))
    assert d is not None
    d.addCallback(done.append)
    assert seen == [[0, 1, 2]] and done == []
    clock.turn()
    assert seen == [[0, 1, 2], [3, 4, 5]] and done == []
    clock.turn()
    # Done in the same turn as the last slice, not one turn later.
    assert seen == [[0, 1, 2], [3, 4, 5], [6]] and done == [None]
    assert clock.getDelayedCalls() == []


def test_few_items_or_no_cooperator_go_at_once():
    seen: list[list[int]] = []
    clock = Turns()
    assert each_slice([1, 2], 3, lambda some: seen.append(list(some)),
                      slice_per_turn(clock)) is None
    assert each_slice(list(range(5)), 2, lambda some: seen.append(list(some)), None) is None
    assert seen == [[1, 2], [0, 1, 2, 3, 4]] and clock.getDelayedCalls() == []


def test_two_tasks_take_turns_and_a_failure_ends_only_its_own():
    clock = Turns()
    slices = slice_per_turn(clock)
    seen: list[str] = []

    def do(some: Any) -> None:
        if "x" in some:
            raise ValueError("x")
        seen.extend(some)

    failed: list[Any] = []
    done: list[object] = []
    first = each_slice("abcdef", 2, do, slices)
    second = each_slice(["1", "2", "x", "3"], 1, do, slices)
    assert first is not None and second is not None
    first.addCallback(done.append)
    second.addErrback(failed.append)
    assert seen == ["a", "b", "1"]
    clock.turn()
    clock.turn()
    assert seen == ["a", "b", "1", "c", "d", "2"] and failed == []
    clock.turn()
    assert seen[-2:] == ["e", "f"] and done == [None] and failed == []
    clock.turn()  # the second's "x"
    assert failed and failed[0].check(ValueError)
    assert seen == ["a", "b", "1", "c", "d", "2", "e", "f"]
    assert clock.getDelayedCalls() == []


class _Stream:
    """What the status document reads of a stream."""

    def __init__(self, n: int) -> None:
        self.namespace = self.request_path = f"/subscribe/raw/{n}"
        self.kind = "raw"
        self.client_ip = "10.0.0.1"
        self.created_at = float(n)
        self.encoded = 0

    def describe_json(self, now: float) -> bytes:
        self.encoded += 1
        return b'{"n":%d}' % self.created_at


class _Up:
    state = "up"


def test_the_status_document_is_built_a_slice_per_turn_once_for_every_waiter():
    clock = Turns()
    hub = Hub()
    streams = [_Stream(n) for n in range(2 * SLICE + 1)]
    for stream in streams:
        hub.add(stream)  # type: ignore[arg-type]
    report = StatusReport(hub, _Up(), node="n", clock=clock, turns=clock)
    got: list[bytes] = []
    report.encoded().addCallback(got.append)
    report.page(0, 2).addCallback(got.append)
    assert sum(s.encoded for s in streams) == SLICE and got == []
    clock.turn()
    assert sum(s.encoded for s in streams) == 2 * SLICE and got == []
    clock.turn()
    assert [s.encoded for s in streams] == [1] * len(streams) and report.builds == 1
    whole, page = got
    assert whole.endswith(b',"connections":[%s]}' % b",".join(
        b'{"n":%d}' % n for n in range(len(streams))))
    assert page.endswith(b'"connections_total":%d,"offset":0,"connections":[{"n":0},{"n":1}]}'
                         % len(streams))
    # Cached for a second: the next request is answered at once, nothing built again.
    report.encoded().addCallback(got.append)
    assert got[-1] == whole and report.builds == 1


def test_a_status_build_that_fails_fails_its_waiters_and_the_next_request_builds_again():
    clock = Turns()
    hub = Hub()
    streams = [_Stream(n) for n in range(SLICE + 1)]
    for stream in streams:
        hub.add(stream)  # type: ignore[arg-type]
    broken = streams[-1]
    broken.describe_json = lambda now: 1 / 0  # type: ignore[assignment,method-assign]
    report = StatusReport(hub, _Up(), node="n", clock=clock, turns=clock)
    failed: list[Any] = []
    report.encoded().addErrback(failed.append)
    clock.turn()
    assert len(failed) == 1 and failed[0].check(ZeroDivisionError)
    del broken.describe_json
    got: list[bytes] = []
    report.encoded().addCallback(got.append)
    clock.turn()
    assert len(got) == 1 and report.builds == 1
