"""The score rollup on a Clock: exact counts per tick, nothing on empty ticks."""

from __future__ import annotations

import json
import random
from collections import Counter

from twisted.application.internet import TimerService
from twisted.internet.task import Clock

from emojistream.summarizer import RATE, ScoreSummarizer


def running(summarizer: ScoreSummarizer, clock: Clock) -> TimerService:
    timer = TimerService(1 / RATE, summarizer.tick)
    timer.clock = clock
    timer.startService()
    return timer


def test_counts_are_exact_across_tick_boundaries():
    sent: list[bytes] = []
    clock = Clock()
    summarizer = ScoreSummarizer(lambda counts, frame: sent.append(frame))
    timer = running(summarizer, clock)
    rng = random.Random(7)
    expected: Counter[str] = Counter()
    ids = ["2665", "1F602", "1F1FA-1F1F8", "2764", "00A9"]
    for _ in range(2000):
        emoji_id = rng.choice(ids)
        summarizer.hit(emoji_id)
        expected[emoji_id] += 1
        clock.advance(rng.choice([0, 0, 0.001, 0.004, 1 / RATE, 0.05]))
    clock.advance(1 / RATE)
    timer.stopService()
    total: Counter[str] = Counter()
    for message in sent:
        assert message.startswith(b"data:{") and message.endswith(b"}\n\n")
        summary = json.loads(message[len(b"data:"):-2])
        assert summary and all(v > 0 for v in summary.values())
        total.update(summary)
    assert total == expected
    # At most one summary per tick of 1/60 s.
    assert len(sent) <= clock.seconds() * RATE + 1


def test_empty_ticks_send_nothing_and_output_is_compact_json():
    sent: list[bytes] = []
    clock = Clock()
    summarizer = ScoreSummarizer(lambda counts, frame: sent.append(frame))
    running(summarizer, clock)
    clock.pump([1 / RATE] * 30)
    assert sent == []
    summarizer.hit("2665")
    summarizer.hit("2665")
    summarizer.hit("1F602")
    clock.advance(1 / RATE)
    assert sent == [b'data:{"2665":2,"1F602":1}\n\n']
    clock.pump([1 / RATE] * 10)
    assert len(sent) == 1


def test_a_failing_timer_call_is_logged_and_the_timer_keeps_running():
    from twisted.logger import globalLogPublisher

    from emojistream.timers import SafeCall

    calls: list[bytes] = []
    events: list[dict] = []

    def emit(counts: dict[str, int], frame: bytes) -> None:
        calls.append(json.dumps(counts, separators=(",", ":")).encode())
        raise RuntimeError("boom")

    clock = Clock()
    summarizer = ScoreSummarizer(emit)
    timer = TimerService(1 / RATE, SafeCall(summarizer.tick, "The score summary"))
    timer.clock = clock
    globalLogPublisher.addObserver(events.append)
    try:
        timer.startService()
        summarizer.hit("A")
        clock.advance(1 / RATE)
        summarizer.hit("B")
        clock.advance(1 / RATE)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert calls == [b'{"A":1}', b'{"B":1}']
    assert timer.running
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 2 and failures[0]["what"] == "The score summary"


def test_ticker_keeps_its_rate_and_catches_up_instead_of_skipping():
    from emojistream.summarizer import Ticker

    clock = Clock()
    calls: list[float] = []
    ticker = Ticker(0.125, lambda: calls.append(clock.seconds()), clock)
    ticker.startService()
    clock.pump([0.0625] * 8)  # 0.5 s, on time
    assert calls == [0.125, 0.25, 0.375, 0.5]
    # The process is busy until 0.9375: the 0.625 tick runs late. A LoopingCall would
    # then wait for the 1.0 slot; the ticker ticks again at once, then on schedule.
    clock.advance(0.4375)
    assert calls[4:] == [0.9375, 0.9375]
    clock.advance(0.125)
    assert calls[6:] == [1.0625]
    ticker.stopService()
    clock.advance(1)
    assert len(calls) == 7


def test_a_failing_tick_is_logged_and_ticking_goes_on(logs):
    from emojistream.summarizer import Ticker

    clock = Clock()
    calls = []

    def fail() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    ticker = Ticker(0.1, fail, clock)
    ticker.startService()
    clock.pump([0.1] * 3)
    assert len(calls) == 3 and ticker.running
    failures = logs.failures()
    assert len(failures) == 3
    assert all(f["log_failure"].getErrorMessage() == "boom" for f in failures)
    assert all("tick failed" in line for line in logs.ours())
