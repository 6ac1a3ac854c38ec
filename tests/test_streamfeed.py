"""The stream reader's decisions on a Clock, against an in-memory Redis spoken to over
RESP (tests/fakestreams.py) through iosim connections: where it starts, that a
reconnection reads on without starting again (late, not lost), and when it must start
again (the stream replaced, entries trimmed unread), each counted and logged once."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from emojistream.config import RedisAddress
from emojistream.history import EntryId, position
from emojistream.redisconn import RedisConnection
from emojistream.streamfeed import REPLACED, TRIMMED, StreamFeed, StreamWatch
from fakestreams import Peer, Store, lease
from test_connection import MemoryEndpoint, events, ours

__all__ = ["events"]  # the fixture, shared with test_connection

KEY = "emojistream:events"
SCORE = b"stream.score_updates"


class Recorder:
    """A L{emojistream.history.StreamHandler} that writes down what it is handed."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, int]] = []
        self.messages: list[tuple[bytes, bytes, int | None]] = []
        self.reads = 0
        self.open = False

    def start(self, epoch: str, since: int) -> None:
        assert not self.open
        self.starts.append((epoch, since))

    def read_started(self) -> None:
        assert not self.open
        self.open = True

    def message(self, channel: bytes, payload: bytes, place: int | None = None) -> None:
        assert self.open
        self.messages.append((channel, payload, place))

    def read_done(self) -> None:
        self.open = False
        self.reads += 1

    def payloads(self) -> list[bytes]:
        return [p for _, p, _ in self.messages]


def scores(start: int, stop: int) -> list[tuple[bytes, bytes]]:
    return [(SCORE, b"%X" % (0x1F600 + i)) for i in range(start, stop)]


class Rig:
    """A store, a feed reading it over a memory endpoint, and what it handed on."""

    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = Store(self.clock)
        self.endpoint = MemoryEndpoint(self.clock, lambda: Peer(self.store))
        self.handler = Recorder()
        self.feed = StreamFeed(RedisAddress(), self.handler, reactor=self.clock,
                               stream_key=KEY, endpoint=self.endpoint,
                               retry_policy=lambda attempt: 0.5, **kwargs)

    def run(self, seconds: float = 0.0) -> None:
        self.endpoint.run(seconds)

    def append(self, messages: list[tuple[bytes, bytes]]) -> list[EntryId]:
        ids = self.store.append(KEY, messages)
        self.endpoint.flush()
        self.clock.advance(0.001)  # the next entries get other milliseconds
        self.run()
        return ids

    def peer(self) -> Peer:
        peer: Any = self.endpoint.servers[-1]
        return peer  # type: ignore[no-any-return]

    def drop(self) -> None:
        """The connection lost (CLIENT KILL): a new one follows after the backoff."""
        self.peer().hang_up()
        self.endpoint.flush()


@pytest.fixture
def rig() -> Any:
    made = Rig()
    yield made
    made.feed.stopService()


def test_a_first_start_is_from_the_newest_entry_then_every_later_one_in_order(rig, events):
    old = rig.append(scores(0, 5))
    rig.feed.startService()
    rig.run(0.1)
    epoch = rig.store.epoch(KEY)
    assert rig.handler.starts == [(epoch, position(old[-1]))]
    assert rig.handler.messages == [] and rig.feed.state == "up"
    new = rig.append(scores(5, 8)) + rig.append(scores(8, 9))
    assert rig.handler.messages == [(c, p, position(e))
                                    for (c, p), e in zip(scores(5, 9), new, strict=True)]
    assert rig.feed.entries == 4 and rig.feed.position == position(new[-1])
    assert rig.feed.last_id == new[-1] and rig.feed.epoch == epoch
    assert ours(events, "from its newest entry")


def test_an_idle_stream_is_read_with_block_and_its_answers_are_the_heartbeat(rig):
    rig.append(scores(0, 1))
    rig.feed.startService()
    rig.run(30)
    reads = [c for c in rig.peer().commands if c[0] == b"XREAD"]
    # One XREAD per second of BLOCK, each followed by the epoch: no PING needed.
    assert 28 <= len(reads) <= 31, len(reads)
    assert reads[0][:6] == [b"XREAD", b"COUNT", b"1000", b"BLOCK", b"1000", b"STREAMS"]
    assert not [c for c in rig.peer().commands if c == [b"PING"]]
    assert rig.feed.losses == 0 and rig.feed.reads >= 28


def test_a_reconnection_reads_on_from_the_last_entry_without_starting_again(rig, events):
    rig.append(scores(0, 2))
    rig.feed.startService()
    rig.run(0.1)
    rig.append(scores(2, 4))
    rig.drop()
    # Appended while the node is away: late, not lost.
    rig.store.append(KEY, scores(4, 10))
    rig.run(2)
    assert rig.feed.state == "up" and rig.feed.losses == 1
    assert len(rig.handler.starts) == 1
    assert rig.handler.payloads() == [p for _, p in scores(2, 10)]
    assert rig.feed.gaps == {REPLACED: 0, TRIMMED: 0}
    assert ours(events, "nothing missed")
    assert len(rig.endpoint.accepted) == 2


def test_a_replaced_stream_is_a_start_again_from_its_newest_entry_counted_once(rig, events):
    rig.append(scores(0, 2))
    rig.feed.startService()
    rig.run(0.1)
    first_epoch = rig.store.epoch(KEY)
    rig.drop()
    rig.store.delete(KEY)
    replaced = rig.store.append(KEY, scores(10, 13))
    rig.run(2)
    epoch = rig.store.epoch(KEY)
    assert epoch != first_epoch
    assert rig.handler.starts[1:] == [(epoch, position(replaced[-1]))]
    assert rig.handler.messages == []  # the new stream's older entries are not this run's
    assert rig.feed.gaps == {REPLACED: 1, TRIMMED: 0}
    warnings = [text for level, text in ours(events, "was replaced") if level == LogLevel.warn]
    assert len(warnings) == 1 and first_epoch in warnings[0] and epoch in warnings[0]
    rig.append(scores(13, 14))
    assert rig.handler.payloads() == [p for _, p in scores(13, 14)]


def test_a_stream_replaced_while_connected_is_noticed_by_the_epoch_after_each_read(rig):
    rig.append(scores(0, 2))
    rig.feed.startService()
    rig.run(0.1)
    rig.store.delete(KEY)
    new = rig.append(scores(20, 23))
    # Those entries came after the old stream's last one, but are another epoch's: not
    # handed on as the old one's.
    assert rig.handler.messages == []
    assert rig.handler.starts[-1] == (rig.store.epoch(KEY), position(new[-1]))
    assert rig.feed.gaps[REPLACED] == 1
    rig.append(scores(23, 24))
    assert rig.handler.payloads() == [p for _, p in scores(23, 24)]


def test_entries_trimmed_before_they_were_read_are_a_start_again_counted_once(rig, events):
    rig.append(scores(0, 2))
    rig.feed.startService()
    rig.run(0.1)
    rig.drop()
    ids = rig.store.append(KEY, scores(2, 50))
    rig.store.trim(KEY, 10)  # the last entry read, and 38 after it, are gone
    rig.run(2)
    assert rig.handler.starts[1:] == [(rig.store.epoch(KEY), position(ids[-1]))]
    assert rig.handler.messages == []
    assert rig.feed.gaps == {REPLACED: 0, TRIMMED: 1}
    assert len([t for level, t in ours(events, "were trimmed") if level == LogLevel.warn]) == 1


def test_a_stream_that_does_not_exist_yet_is_waited_for(rig, events):
    rig.feed.startService()
    rig.run(5)
    assert rig.feed.state == "up" and rig.feed.waiting and rig.handler.starts == []
    assert len(ours(events, "does not exist")) == 1
    reading = rig.feed.when_reading()
    first = rig.append(scores(0, 3))
    rig.run(1.5)
    assert reading.called and not rig.feed.waiting
    assert rig.handler.starts == [(rig.store.epoch(KEY), position(first[-1]))]
    rig.append(scores(3, 4))
    assert rig.handler.payloads() == [p for _, p in scores(3, 4)]


def test_a_read_that_does_not_answer_within_block_and_margin_replaces_the_connection(
        rig, events):
    rig.append(scores(0, 1))
    rig.feed.startService()
    rig.run(0.1)
    rig.peer().wedged = True
    rig.run(3.5)  # BLOCK 1 s + 2 s
    assert rig.feed.losses == 1
    assert ours(events, "no answer to XREAD within 3 s")
    rig.store.append(KEY, scores(1, 3))
    rig.run(2)
    assert rig.feed.state == "up" and rig.handler.payloads() == [p for _, p in scores(1, 3)]
    assert len(rig.handler.starts) == 1


def test_entries_of_another_writer_are_skipped_and_logged_once_a_period(rig, events):
    rig.append(scores(0, 1))
    rig.feed.startService()
    rig.run(0.1)
    for _ in range(3):
        rig.store.append(KEY, [], fields=[b"other", b"writer"])
    rig.append(scores(1, 2))
    assert rig.handler.payloads() == [p for _, p in scores(1, 2)]
    assert rig.feed.skipped == 3 and rig.feed.entries == 1
    assert len(ours(events, "not emojistream's")) == 1


def test_a_full_page_s_successor_waits_for_the_next_turn():
    rig = Rig(count=5)
    rig.append(scores(0, 1))
    rig.feed.startService()
    rig.run(0.1)
    rig.store.append(KEY, scores(1, 13))
    rig.endpoint.flush()
    assert len(rig.handler.messages) == 5
    rig.clock.advance(0)
    rig.endpoint.flush()
    assert len(rig.handler.messages) == 10
    rig.run()
    assert rig.handler.payloads() == [p for _, p in scores(1, 13)]
    assert rig.handler.reads == 3
    rig.feed.stopService()


def test_the_watch_sees_length_lag_and_the_bridge_s_lease(rig):
    rig.append(scores(0, 3))
    commands = RedisConnection(RedisAddress(), reactor=rig.clock, purpose="command",
                               endpoint=rig.endpoint)
    watch = StreamWatch(rig.feed, commands, clock=rig.clock, cap=4)
    commands.startService()
    rig.feed.startService()
    rig.run(0.1)
    lease(rig.store, KEY, b"host/1/ab", 5.0)
    watch.check()
    rig.run()
    assert watch.length == 3 and watch.lag == 0
    assert watch.bridge is not None and watch.bridge["holder"] == "host/1/ab"
    assert 4900 <= watch.bridge["ttl_ms"] <= 5000
    rig.feed.stopService()  # the node falls behind
    rig.store.append(KEY, scores(3, 6))
    watch.check()
    rig.run()
    assert watch.length == 6 and watch.lag == 3
    rig.store.append(KEY, scores(6, 12))
    rig.run(6)
    watch.check()
    rig.run()
    assert watch.lag == 4  # capped
    assert watch.bridge is None  # the lease ran out
    figures = watch.figures()
    assert figures["gaps"] == {REPLACED: 0, TRIMMED: 0} and figures["lag"] == 4
    commands.stopService()
