"""One answer serves every request for CACHE_SECONDS, written once: the rule, and the
status document, the cluster view and the rankings each keeping to it on a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from emojistream.cache import CACHE_SECONDS, fresh
from emojistream.cluster import ClusterView
from emojistream.hub import Hub
from emojistream.rankings import Rankings
from emojistream.status import StatusReport


def test_fresh_for_less_than_the_seconds_and_never_from_the_future():
    assert fresh(10.0, 10.0) and fresh(10.0, 10.0 + CACHE_SECONDS - 0.001)
    assert not fresh(10.0, 10.0 + CACHE_SECONDS)
    assert not fresh(10.0, 9.5)  # the clock was set back
    assert fresh(10.0, 14.0, seconds=5) and not fresh(10.0, 15.0, seconds=5)


class _Redis:
    """A kept connection whose protocol counts the reads and answers at once."""

    state = "up"

    def __init__(self) -> None:
        self.protocol = self
        self.reads = 0

    def hkeys(self, key: Any) -> Deferred[list[bytes]]:
        self.reads += 1
        return succeed([])

    def execute_command(self, *args: Any) -> Deferred[list[bytes]]:
        self.reads += 1
        return succeed([])


def reads_over_time(read: Any, count: Any, clock: Clock) -> list[int]:
    """How many reads were made after a request at 0, just before CACHE_SECONDS, at
    CACHE_SECONDS, and after the clock went back."""
    seen = []
    for step in (0, CACHE_SECONDS - 0.001, 0.001, -0.5):
        clock.rightNow += step  # Clock.advance goes forward only
        read()
        seen.append(count())
    return seen


def test_status_cluster_and_rankings_each_serve_one_answer_for_cache_seconds():
    clock = Clock()
    clock.advance(100)
    status = StatusReport(Hub(), _Redis(), node="n", clock=clock)
    redis = _Redis()
    view = ClusterView(redis, clock=clock)
    ranks_redis = _Redis()
    rankings = Rankings(ranks_redis, clock=clock, known={})
    for read, count in ((status.encoded, lambda: status.builds),
                        (view.encoded, lambda: redis.reads),
                        (lambda: rankings.top(1), lambda: ranks_redis.reads)):
        assert reads_over_time(read, count, clock) == [1, 1, 2, 3]
