"""The bridge's lease and takeover on a Clock, against an in-memory Redis that keeps
the scripts' promises (a fenced append, a lease that runs out, a release notice
published to every subscriber). The same on a real Redis: tests/test_bridge.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock

from emojistream.bridge import DROP_LOG_PERIOD, Bridge, NotConnected, State
from emojistream.history import release_channel

KEY = "k"
LEASE = 3.0


class FakeRedis:
    """A stream, a lease, and pub/sub to the bridges subscribed (one order for all)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.entries: list[tuple[bytes, bytes]] = []
        self.holder: str | None = None
        self.expires = 0.0
        self.subscribers: list[Bridge] = []

    def lease(self) -> str | None:
        if self.holder is not None and self.clock.seconds() >= self.expires:
            self.holder = None
        return self.holder

    def publish(self, channel: bytes, payload: bytes) -> None:
        for bridge in list(self.subscribers):
            bridge.message(channel, payload)
            bridge.read_done()

    def publish_many(self, messages: list[tuple[bytes, bytes]]) -> None:
        """Several messages in one read of each subscriber."""
        for bridge in list(self.subscribers):
            for channel, payload in messages:
                bridge.message(channel, payload)
            bridge.read_done()


class FakeHistory:
    """One bridge's command connection to L{FakeRedis}: up or down, and stalled
    (calls wait, run when resumed) to stand for a slow or vanished Redis."""

    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.up = True
        self.stalled = False
        self.waiting: list[tuple[Deferred[Any], Callable[[], Any]]] = []
        self.appends = 0

    def _call(self, run: Callable[[], Any]) -> Deferred[Any]:
        if not self.up:
            return fail(NotConnected("down"))
        if self.stalled:
            d: Deferred[Any] = Deferred()
            self.waiting.append((d, run))
            return d
        return succeed(run())

    def resume(self, *, lose_replies: bool = False) -> None:
        """Run what waited; with C{lose_replies}, the connection is lost before the
        replies come (Redis did it, the bridge cannot know)."""
        self.stalled = False
        waiting, self.waiting = self.waiting, []
        for d, run in waiting:
            result = run()
            if lose_replies:
                d.errback(ConnectionLost("lost"))
            else:
                d.callback(result)

    def acquire(self, holder: str, lease_ms: int) -> Deferred[tuple[int, bytes]]:
        def run() -> tuple[int, bytes]:
            redis = self.redis
            current = redis.lease()
            if current == holder:
                redis.expires = redis.clock.seconds() + lease_ms / 1000
                return 1, holder.encode()
            if current is None:
                redis.holder = holder
                redis.expires = redis.clock.seconds() + lease_ms / 1000
                return 2, holder.encode()
            return 0, current.encode()
        return self._call(run)

    def release(self, holder: str) -> Deferred[int]:
        def run() -> int:
            if self.redis.lease() == holder:
                self.redis.holder = None
                self.redis.publish(release_channel(KEY), holder.encode())
                return 1
            return 0
        return self._call(run)

    def append(self, holder: str, messages: Any) -> Deferred[int]:
        def run() -> int:
            if self.redis.lease() != holder:
                return -1
            self.redis.entries.extend(messages)
            self.appends += 1
            return len(messages)
        return self._call(run)

    def tail(self, count: int) -> Deferred[list[tuple[bytes, bytes]]]:
        return self._call(lambda: self.redis.entries[-count:])


class Feed:
    state = "up"


def make_bridge(redis: FakeRedis, ident: str, **kwargs: Any) -> tuple[Bridge, FakeHistory]:
    history = FakeHistory(redis)
    bridge = Bridge(history, Feed(), clock=redis.clock, stream_key=KEY, lease=LEASE,
                    ident=ident, **kwargs)
    bridge.subscribing()
    redis.subscribers.append(bridge)
    bridge.startService()
    return bridge, history


def messages(start: int, stop: int) -> list[tuple[bytes, bytes]]:
    """Score updates of random-looking IDs and detail updates with unique payloads."""
    out = []
    for n in range(start, stop):
        emoji = str(n * 7919 % 13).encode()
        out.append((b"stream.score_updates", emoji))
        out.append((b"stream.tweet_updates." + emoji, b'{"id":%d}' % n))
    return out


def publish(redis: FakeRedis, start: int, stop: int) -> list[tuple[bytes, bytes]]:
    sent = messages(start, stop)
    for channel, payload in sent:
        redis.publish(channel, payload)
    return sent


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def redis(clock: Clock) -> FakeRedis:
    return FakeRedis(clock)


def test_one_bridge_takes_the_lease_and_appends_in_order(redis, clock, logs):
    bridge, _ = make_bridge(redis, "a")
    assert bridge.state == State.ACTIVE and redis.holder == "a"
    sent = publish(redis, 0, 50)
    assert redis.entries == sent
    assert bridge.appended == 100 and bridge.dropped == 0
    assert "Bridge a is the active bridge: appending to k" in logs.ours()


def test_a_read_of_many_messages_is_one_append(redis, clock):
    _bridge, history = make_bridge(redis, "a")
    redis.publish_many(messages(0, 300))
    # 600 messages, one script call (a call carries up to 1,000).
    assert history.appends == 1 and redis.entries == messages(0, 300)


def test_two_bridges_append_each_message_once(redis, clock, logs):
    a, _ = make_bridge(redis, "a")
    b, _ = make_bridge(redis, "b")
    sent = []
    for second in range(10):
        sent += publish(redis, second * 10, second * 10 + 10)
        clock.advance(1)
    assert redis.entries == sent
    assert (a.state, b.state) == (State.ACTIVE, State.STANDBY)
    assert "Bridge b stands by: bridge a appends to k" in logs.ours()


def test_a_silent_death_the_standby_takes_over_within_a_lease_and_appends_the_rest_once(
        redis, clock, logs):
    a, history_a = make_bridge(redis, "a")
    b, _ = make_bridge(redis, "b")
    sent = publish(redis, 0, 20)
    # a is gone: its calls are never answered, it hears nothing more.
    history_a.stalled = True
    redis.subscribers.remove(a)
    died = clock.seconds()
    second = 0
    while b.state != State.ACTIVE:
        sent += publish(redis, 20 + second * 5, 25 + second * 5)
        clock.advance(0.5)
        second += 1
        assert clock.seconds() - died <= LEASE + LEASE / 3 + 0.5, "no takeover"
    sent += publish(redis, 1000, 1010)
    assert redis.entries == sent
    assert "Bridge b is the active bridge: appending to k" in logs.ours()


def test_a_stop_gives_the_lease_up_and_the_standby_takes_over_at_once(redis, clock, logs):
    a, _ = make_bridge(redis, "a")
    b, _ = make_bridge(redis, "b")
    sent = publish(redis, 0, 10)
    redis.subscribers.remove(a)  # the subscriber stops first
    sent += publish(redis, 10, 12)  # heard by b only
    stopped = a.stopService()
    assert stopped.called
    assert "Bridge a released the lease on k" in logs.ours()
    clock.advance(0)  # b asks as soon as it hears the notice
    assert b.state == State.ACTIVE
    sent += publish(redis, 12, 20)
    assert redis.entries == sent


def test_a_stopping_bridge_appends_what_waits_before_it_gives_the_lease_up(redis, clock):
    a, history = make_bridge(redis, "a")
    history.stalled = True
    sent = publish(redis, 0, 10)
    redis.subscribers.remove(a)
    stopped = a.stopService()
    assert not stopped.called and redis.holder == "a"
    history.resume()
    assert stopped.called and redis.entries == sent and redis.holder is None


def test_a_bridge_that_stalled_past_its_lease_appends_nothing_after_the_takeover(
        redis, clock, logs):
    a, history_a = make_bridge(redis, "a")
    b, _ = make_bridge(redis, "b")
    history_a.stalled = True  # Redis answers a no more (a's host is frozen, say)
    sent = publish(redis, 0, 10)
    clock.advance(LEASE + LEASE / 3 + 0.1)
    assert b.state == State.ACTIVE
    sent += publish(redis, 10, 20)
    history_a.resume()  # a's calls land now, after b took the lease
    assert redis.entries == sent
    assert a.state == State.STANDBY
    assert any(line.startswith("Bridge a lost the lease on k") for line in logs.ours())


def test_an_append_whose_reply_was_lost_is_not_appended_twice(redis, clock, logs):
    a, history = make_bridge(redis, "a")
    sent = publish(redis, 0, 5)
    history.stalled = True
    sent += publish(redis, 5, 10)
    history.resume(lose_replies=True)  # appended, but a only sees the loss
    sent += publish(redis, 10, 15)
    clock.advance(LEASE / 3)
    assert a.state == State.ACTIVE
    assert redis.entries == sent


def test_a_takeover_waits_for_the_stream_s_newest_entry_to_be_heard(redis, clock):
    """The old holder appended a message the new one has not read yet: it is skipped
    when it comes, not appended again."""
    a, _ = make_bridge(redis, "a")
    b, _ = make_bridge(redis, "b")
    sent = publish(redis, 0, 5)
    late = messages(5, 6)
    # a hears and appends it; b's copy is still on its way.
    a.message(*late[0])
    a.message(*late[1])
    a.read_done()
    redis.subscribers.remove(a)
    a.stopService()
    clock.advance(0)
    assert b.state == State.ACTIVE
    for m in late:
        b.message(*m)
    b.read_done()
    sent += late + publish(redis, 6, 10)
    assert redis.entries == sent


def test_a_takeover_that_never_finds_the_newest_entry_appends_all_it_heard(
        redis, clock, logs):
    redis.entries = [(b"stream.score_updates", b"from-another-life")]
    a, _ = make_bridge(redis, "a")
    assert a.state == State.ACTIVE
    sent = publish(redis, 0, 5)
    assert redis.entries == redis.entries[:1]  # waiting to hear it
    clock.advance(LEASE / 3)
    assert redis.entries[1:] == sent
    assert any("is not among the 10 messages it heard" in line for line in logs.ours())


def test_a_stalled_redis_caps_what_waits_and_counts_the_rest_logging_once_a_period(
        redis, clock, logs):
    a, history = make_bridge(redis, "a", max_pending=50)
    history.stalled = True
    publish(redis, 0, 100)  # 200 messages, 50 may wait
    assert a.dropped == 150
    clock.advance(LEASE / 3)
    publish(redis, 100, 110)
    clock.advance(LEASE / 3)
    drops = [line for line in logs.ours() if "dropped" in line]
    assert drops == ["Bridge a dropped 150 messages (more than 50 waited for Redis to "
                     "take them); 150 since start"]
    clock.advance(DROP_LOG_PERIOD)
    assert [line for line in logs.ours() if "dropped" in line][1:] == [
        "Bridge a dropped 20 messages (more than 50 waited for Redis to take them); "
        "170 since start"]
    assert a.dropped == 170


def test_a_holder_whose_subscription_broke_gives_the_lease_to_a_standby(redis, clock, logs):
    a, _ = make_bridge(redis, "a")
    b, _ = make_bridge(redis, "b")
    sent = publish(redis, 0, 5)
    redis.subscribers.remove(a)
    sent += publish(redis, 5, 8)  # a misses these
    a.subscribing()  # a resubscribed
    redis.subscribers.append(a)
    clock.advance(0)
    assert (a.state, b.state) == (State.STANDBY, State.ACTIVE)
    sent += publish(redis, 8, 12)
    assert redis.entries == sent


def test_a_lost_command_connection_past_the_lease_is_down_then_stands_by(
        redis, clock, logs):
    a, history_a = make_bridge(redis, "a")
    b, _ = make_bridge(redis, "b")
    history_a.up = False
    sent = publish(redis, 0, 5)
    clock.advance(LEASE + 0.1)
    assert a.state == State.DOWN
    clock.advance(LEASE / 3)
    assert b.state == State.ACTIVE
    history_a.up = True
    clock.advance(LEASE / 3)
    assert a.state == State.STANDBY
    sent += publish(redis, 5, 9)
    assert redis.entries == sent
    lines = logs.ours()
    assert any(line.startswith("Bridge a lost the lease on k: the lease ran out") for line in lines)
    assert "Bridge a is down: its command connection is down" in lines


def test_the_summary_says_state_and_counts(redis, clock):
    a, _ = make_bridge(redis, "a")
    publish(redis, 0, 3)
    assert a.summary() == "active, 6 appended, 0 dropped to k"
