"""A timer's call that survives its exceptions, written once and used by the service's
timers, the summary Ticker and the demo Feeder: on a Clock, each exception is logged
once with its traceback, and the timer goes on (pure logic, no reactor, no Redis)."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from conftest import LogCapture
from emojistream.config import RedisAddress
from emojistream.demo import Feeder
from emojistream.summarizer import Ticker
from emojistream.timers import SafeCall


def _explode(calls: list[float], clock: Clock) -> None:
    calls.append(clock.seconds())
    if len(calls) == 1:
        raise RuntimeError("boom")


def assert_logged_once_with_traceback(logs: LogCapture, what: str) -> None:
    [failure] = logs.failures()
    assert failure["log_format"] == "{what} failed" and failure["what"] == what
    assert failure["log_failure"].check(RuntimeError)
    # The traceback reaches into the call that raised.
    assert "_explode" in failure["log_failure"].getTraceback()
    assert [line for line in logs.ours() if "failed" in line] == [f"{what} failed"]


def test_a_timer_whose_call_raises_logs_it_once_and_calls_again(logs: LogCapture):
    clock = Clock()
    calls: list[float] = []
    timer = TimerService(1.0, SafeCall(_explode, "The job"), calls, clock)
    timer.clock = clock
    timer.startService()
    clock.pump([1.0] * 3)
    assert calls == [0.0, 1.0, 2.0, 3.0] and timer.running
    assert_logged_once_with_traceback(logs, "The job")
    timer.stopService()


def test_the_ticker_logs_a_tick_that_raises_once_and_ticks_on(logs: LogCapture):
    clock = Clock()
    calls: list[float] = []
    ticker = Ticker(0.5, lambda: _explode(calls, clock), clock)
    ticker.startService()
    clock.pump([0.5] * 3)
    assert calls == [0.5, 1.0, 1.5] and ticker.running
    assert_logged_once_with_traceback(logs, "A tick")
    ticker.stopService()


def test_the_demo_feeder_logs_a_tick_that_raises_once_and_feeds_on(logs: LogCapture):
    clock = Clock()
    feeder = Feeder(RedisAddress(host="127.0.0.1", port=1), reactor=clock, rate=100)
    calls: list[float] = []

    class Raising:
        """A Redis protocol whose first command raises."""

        def execute_command(self, *args: Any) -> Any:
            _explode(calls, clock)
            return Deferred()

        def publish(self, *args: Any) -> Any:
            return self.execute_command(*args)

    feeder._connection.protocol = Raising()
    [timer] = [s for s in feeder if isinstance(s, TimerService)]
    timer.startService()  # the timer alone: no connection to Redis is made
    clock.pump([Feeder.TICK] * 30)  # about 12 hits at 100 a second
    assert timer.running and feeder.published >= 10
    assert_logged_once_with_traceback(logs, "Publishing demo hits")
    timer.stopService()
