"""What a resume reads from the stream (streamhistory.RedisHistory) on a Clock, over a
real command connection's protocol to the in-memory Redis of tests/fakestreams.py:
pages, one per turn; the entry resumed from must still be there; the count bound;
a few fetches at a time, the rest queued; Redis down is waited for a while, then
a failure."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from emojistream.bridge import NotConnected
from emojistream.config import RedisAddress
from emojistream.history import EntryId, position
from emojistream.redisconn import RedisConnection
from emojistream.streamhistory import RECONNECT_WAIT, HistoryBusy, RedisHistory
from fakestreams import Peer, Store
from test_connection import MemoryEndpoint

KEY = "emojistream:events"


class Rig:
    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = Store(self.clock)
        self.endpoint = MemoryEndpoint(self.clock, lambda: Peer(self.store))
        self.connection = RedisConnection(RedisAddress(), reactor=self.clock,
                                          purpose="command", endpoint=self.endpoint)
        self.history = RedisHistory(self.connection, KEY, clock=self.clock, **kwargs)
        self.ids: list[EntryId] = []
        self.sent: list[tuple[bytes, bytes]] = []

    def append(self, n: int) -> None:
        for _ in range(n):
            i = len(self.sent)
            message = (b"stream.tweet_updates.2665", b'{"n":%d}' % i)
            self.ids += self.store.append(KEY, [message])
            self.sent.append(message)
            self.clock.advance(0.0004)

    def expected(self, start: int, stop: int) -> list[tuple[int, bytes, bytes]]:
        return [(position(e), c, p) for e, (c, p) in
                zip(self.ids[start:stop], self.sent[start:stop], strict=True)]

    def at(self, i: int) -> int:
        return position(self.ids[i])

    def peer(self) -> Peer:
        peer: Any = self.endpoint.servers[-1]
        return peer  # type: ignore[no-any-return]

    def xranges(self) -> int:
        return sum(c[0] == b"XRANGE" for c in self.peer().commands)

    def run(self, seconds: float = 0) -> None:
        self.endpoint.run(seconds)


@pytest.fixture
def rig() -> Any:
    made = Rig(page=10)
    made.connection.startService()
    made.run()
    yield made
    made.connection.stopService()


def result(d: Any) -> Any:
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "not fired"
    return got[0]


def test_the_entries_after_a_position_up_to_another_in_pages_one_per_turn(rig):
    rig.append(40)
    d = rig.history.entries_after(rig.at(3), rig.at(30), 100)
    rig.clock.advance(0)
    rig.endpoint.flush()
    assert rig.xranges() == 1 and not d.called
    # The first page starts at the entry resumed from, inclusive: it must be there.
    assert rig.peer().commands[-1][2:] == [str(rig.ids[3]).encode(),
                                           str(rig.ids[30]).encode(), b"COUNT", b"10"]
    rig.endpoint.flush()
    assert rig.xranges() == 1  # the next page waits for the next turn
    rig.run()
    assert result(d) == rig.expected(4, 31)
    assert rig.xranges() == 3 and rig.history.pages == 3
    assert rig.history.running == 0


def test_an_entry_resumed_from_that_was_trimmed_or_never_was_is_none(rig):
    rig.append(20)
    rig.store.trim(KEY, 10)
    d = rig.history.entries_after(rig.at(5), rig.at(19), 100)
    rig.run()
    assert result(d) is None
    never = position(EntryId(rig.ids[12].ms, rig.ids[12].seq + 7))
    d = rig.history.entries_after(never, rig.at(19), 100)
    rig.run()
    assert result(d) is None
    d = rig.history.entries_after(rig.at(12), rig.at(19), 100)
    rig.run()
    assert result(d) == rig.expected(13, 20)


def test_more_than_max_entries_between_is_none_and_reads_no_further(rig):
    rig.append(60)
    d = rig.history.entries_after(rig.at(0), rig.at(59), 25)
    rig.run()
    assert result(d) is None
    assert rig.xranges() == 3  # 25 + 1 read, not 59
    d = rig.history.entries_after(rig.at(0), rig.at(25), 25)
    rig.run()
    assert result(d) == rig.expected(1, 26)
    assert rig.history.entries_after(rig.at(9), rig.at(9), 5).result == []


def test_entries_of_another_writer_are_left_out(rig):
    rig.append(3)
    rig.store.append(KEY, [], fields=[b"x", b"y"])
    rig.clock.advance(0.001)
    rig.append(2)
    d = rig.history.entries_after(rig.at(0), rig.at(4), 100)
    rig.run()
    assert result(d) == rig.expected(1, 5)


def test_redis_lost_mid_read_the_fetch_reads_the_page_again_once_it_is_back(rig):
    rig.append(30)
    d = rig.history.entries_after(rig.at(0), rig.at(29), 100)
    rig.clock.advance(0)
    rig.peer().hang_up()  # the first page's XRANGE is in flight
    rig.endpoint.flush()
    assert rig.connection.protocol is None and not d.called
    rig.run(1)  # the connection's backoff, then the pages
    assert result(d) == rig.expected(1, 30)
    assert rig.history.running == 0


def test_redis_down_longer_than_the_wait_fails_the_fetch_and_a_cancel_ends_it(rig):
    rig.append(30)
    rig.endpoint.peer = lambda: None  # Redis is gone
    rig.peer().hang_up()
    rig.endpoint.flush()
    d = rig.history.entries_after(rig.at(0), rig.at(29), 100)
    rig.run(RECONNECT_WAIT - 0.1)
    assert not d.called and rig.history.running == 1
    rig.run(0.2)
    assert result(d).check(NotConnected)
    assert rig.history.running == 0
    cancelled = rig.history.entries_after(rig.at(0), rig.at(29), 100)
    rig.run(1)
    cancelled.cancel()
    assert result(cancelled).check(CancelledError) and rig.history.running == 0


def test_four_fetches_read_at_once_the_rest_wait_their_turn_in_order(rig):
    rig.append(30)
    rig.peer().wedged = True
    fetches = [rig.history.entries_after(rig.at(i), rig.at(29), 100) for i in range(7)]
    rig.clock.advance(0)
    rig.endpoint.flush()
    assert rig.xranges() == 4
    assert rig.history.running == 4 and rig.history.waiting == 3
    # A client that went away while waiting leaves the queue.
    fetches[5].cancel()
    assert result(fetches[5]).check(CancelledError) and rig.history.waiting == 2
    rig.peer().wedged = False
    rig.peer().run()
    rig.run()
    for i, d in enumerate(fetches):
        if i != 5:
            assert result(d) == rig.expected(i + 1, 30), i
    assert rig.history.fetches == 6 and rig.history.running == 0


def test_past_the_waiting_bound_a_fetch_fails_at_once():
    made = Rig(in_flight=1, max_waiting=2)
    made.connection.startService()
    made.run()
    made.append(5)
    made.peer().wedged = True
    fetches = [made.history.entries_after(made.at(0), made.at(4), 10) for _ in range(4)]
    assert result(fetches[3]).check(HistoryBusy) and made.history.busy == 1
    made.peer().wedged = False
    made.peer().run()
    made.run()
    assert all(result(d) == made.expected(1, 5) for d in fetches[:3])
    again = made.history.entries_after(made.at(0), made.at(4), 10)
    made.run()
    assert result(again) == made.expected(1, 5)
    made.connection.stopService()
