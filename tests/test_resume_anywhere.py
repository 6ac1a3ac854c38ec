"""Resuming on any node from a stream source's shared IDs (issue 20), in memory on a
Clock: two nodes read the same entries; a client moves between them with its
Last-Event-ID and gets every event once, in order, and /eps totals exactly (fast)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from emojistream.history import EntryId, position
from emojistream.hub import Hub
from emojistream.replay import Journal, Recall
from emojistream.router import Router, hit_of
from emojistream.subscription import Subscription
from emojistream.summarizer import ScoreSummarizer
from emojistream.vocabulary import EPS_NAMESPACE, SCORE_CHANNEL
from emojistream.writers import writer_for
from test_subscription import Connection

EPOCH = "0123456789abcdef"
T0 = 1_700_000_000  # seconds: the entries' IDs are milliseconds after it
DETAIL = b"stream.tweet_updates.2665"


class Stream:
    """A stream's entries, read as RedisHistory reads them: the reads answer when the
    test says (as a Redis round trip would, later)."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, bytes, bytes]] = []
        self.pending: list[tuple[Deferred[Any], int, int, int]] = []
        self._ms = T0 * 1000

    def append(self, channel: bytes, payload: bytes) -> tuple[int, bytes, bytes]:
        self._ms += 1
        entry = (position(EntryId(self._ms, 0)), channel, payload)
        self.entries.append(entry)
        return entry

    def entries_after(self, after: int, until: int, max_entries: int
                      ) -> Deferred[list[tuple[int, bytes, bytes]] | None]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, after, until, max_entries))
        return d

    def answer(self) -> None:
        pending, self.pending = self.pending, []
        for d, after, until, max_entries in pending:
            if after not in [place for place, _, _ in self.entries]:
                d.callback(None)  # trimmed, or never there
                continue
            found = [e for e in self.entries if after < e[0] <= until]
            d.callback(found if len(found) <= max_entries else None)

    def fail(self) -> None:
        pending, self.pending = self.pending, []
        for d, *_ in pending:
            d.errback(Failure(ConnectionError("Redis is gone")))


class Node:
    """One daemon's core: hub, journal with positions, router, summarizer, recall."""

    def __init__(self, clock: Clock, stream: Stream, since: int) -> None:
        self.clock = clock
        self.hub = Hub()
        self.journal = Journal(clock, positions=True)
        self.summarizer = ScoreSummarizer(
            lambda counts, frame: self.hub.publish_summary(EPS_NAMESPACE, frame, counts),
            encode=self.journal.summary)
        self.router = Router(self.hub, self.summarizer, raw_stream=True,
                             journal=self.journal)
        self.recall = Recall(stream, self.journal, event_of=self.router.event_of,
                             hit_of=hit_of, max_entries=10_000)
        self.router.start(EPOCH, since)

    def read(self, *entries: tuple[int, bytes, bytes]) -> None:
        self.router.read_started()
        for place, channel, payload in entries:
            self.router.message(channel, payload, place)
        self.router.read_done()

    def read_and_tick(self, *entries: tuple[int, bytes, bytes]) -> None:
        """A read, then the tick: a summary of its hits (and any before)."""
        self.read(*entries)
        self.summarizer.tick()

    def subscribe(self, path: str, last_id: str | None = None,
                  max_queue: int = 1 << 20) -> Connection:
        headers = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
        connection = Connection(self.clock, path, headers)
        namespace = path.removeprefix("/subscribe")
        kind = namespace.split("/")[1]
        writer = writer_for(kind, connection.request, max_queue=max_queue, batcher=None,
                            framer=None)
        Subscription(writer, hub=self.hub, clock=self.clock, namespace=namespace,
                     kind=kind, client_ip="192.0.2.7", max_queue=max_queue
                     ).start(self.journal, None, self.recall)
        return connection


def clock() -> Clock:
    c = Clock()
    c.advance(T0 + 60)
    return c


def details(connection: Connection) -> list[str]:
    return [e.data for e in connection.events() if e.type == "stream.tweet_updates.2665"]


def last_id(connection: Connection) -> str:
    return connection.events()[-1].last_event_id


def test_an_event_has_the_same_id_and_bytes_on_every_node() -> None:
    c, stream = clock(), Stream()
    a, b = Node(c, stream, 0), Node(c, stream, 0)
    on_a, on_b = a.subscribe("/subscribe/details/2665"), b.subscribe("/subscribe/details/2665")
    entry = stream.append(DETAIL, b'{"n":1}')
    a.read(entry)
    b.read(entry)
    assert on_a.body == on_b.body
    assert on_a.events()[0].last_event_id == f"{EPOCH}-{T0 * 1000 + 1}-0"


def test_a_client_moved_to_a_node_that_started_later_gets_the_rest_from_the_stream() -> None:
    c, stream = clock(), Stream()
    a = Node(c, stream, 0)
    on_a = a.subscribe("/subscribe/details/2665")
    entries = [stream.append(DETAIL, b'{"n":%d}' % n) for n in range(1, 11)]
    a.read(*entries[:6])
    seen = last_id(on_a)  # the client saw 1..6, then its connection broke
    b = Node(c, stream, entries[6][0])  # B started reading after entry 7
    b.read(*entries[7:])
    on_b = b.subscribe("/subscribe/details/2665", seen)
    assert details(on_b) == []  # reading the stream; live events wait
    more = [stream.append(DETAIL, b'{"n":%d}' % n) for n in (11, 12)]
    b.read(*more)
    stream.answer()
    assert details(on_b) == [json.dumps({"n": n}, separators=(",", ":"))
                             for n in range(7, 13)]
    b.read(stream.append(DETAIL, b'{"n":13}'))
    assert details(on_b)[-1] == '{"n":13}' and len(details(on_b)) == 7
    assert b.journal.fetched == 1


def test_a_node_behind_the_client_leaves_out_what_it_has_had() -> None:
    c, stream = clock(), Stream()
    a, b = Node(c, stream, 0), Node(c, stream, 0)
    on_a = a.subscribe("/subscribe/details/2665")
    entries = [stream.append(DETAIL, b'{"n":%d}' % n) for n in range(1, 6)]
    a.read(*entries)
    b.read(*entries[:3])  # B has read up to 3, A up to 5
    on_b = b.subscribe("/subscribe/details/2665", last_id(on_a))
    b.read(*entries[3:])
    assert details(on_b) == []
    b.read(stream.append(DETAIL, b'{"n":6}'))
    assert details(on_b) == ['{"n":6}']


def hits(connection: Connection) -> dict[str, int]:
    total: dict[str, int] = {}
    for event in connection.events():
        for emoji_id, n in json.loads(event.data).items():
            total[emoji_id] = total.get(emoji_id, 0) + n
    return total


def test_eps_totals_are_exact_on_another_node_that_ticks_elsewhere() -> None:
    c, stream = clock(), Stream()
    a, b = Node(c, stream, 0), Node(c, stream, 0)
    on_a = a.subscribe("/subscribe/eps")
    ids = [b"2665", b"1F602", b"2665", b"1F60D", b"2665", b"1F602", b"2665"]
    entries = [stream.append(SCORE_CHANNEL, i) for i in ids]
    a.read_and_tick(*entries[:2])
    a.read_and_tick(*entries[2:5])  # A's ticks: after 2 and after 5
    b.read_and_tick(*entries[:3])   # B's ticks: after 3 ...
    b.read_and_tick(*entries[3:6])  # ... and after 6
    on_b = b.subscribe("/subscribe/eps", last_id(on_a))  # A's bound: after 5
    stream.answer()  # B counts the hits after 5 up to its own bound, 6, in the stream
    b.read_and_tick(entries[6])
    total = {k: hits(on_a).get(k, 0) + hits(on_b).get(k, 0)
             for k in set(hits(on_a)) | set(hits(on_b))}
    assert total == {"2665": 4, "1F602": 2, "1F60D": 1}
    assert on_b.events()[-1].last_event_id == f"{EPOCH}-{T0 * 1000 + 7}-0"


def test_eps_totals_are_exact_on_a_node_behind_the_client() -> None:
    c, stream = clock(), Stream()
    a, b = Node(c, stream, 0), Node(c, stream, 0)
    on_a = a.subscribe("/subscribe/eps")
    entries = [stream.append(SCORE_CHANNEL, b"2665") for _ in range(6)]
    a.read_and_tick(*entries[:4])  # the client has 4 hits
    b.read_and_tick(*entries[:2])
    on_b = b.subscribe("/subscribe/eps", last_id(on_a))
    b.read_and_tick(*entries[2:3])  # covers 3: the client's already
    b.read_and_tick(*entries[3:6])  # covers 4..6: 4 is the client's
    stream.answer()
    assert hits(on_a) == {"2665": 4} and hits(on_b) == {"2665": 2}


def test_a_trimmed_history_is_a_gap_with_an_id_to_go_on_from() -> None:
    c, stream = clock(), Stream()
    a = Node(c, stream, 0)
    on_a = a.subscribe("/subscribe/details/2665")
    entries = [stream.append(DETAIL, b'{"n":%d}' % n) for n in range(1, 6)]
    a.read(*entries[:2])
    seen = last_id(on_a)
    del stream.entries[:3]  # MAXLEN trimmed entries 1..3 away
    b = Node(c, stream, entries[3][0])
    b.read(entries[4])
    on_b = b.subscribe("/subscribe/details/2665", seen)
    stream.answer()
    (gap,) = on_b.events()
    assert gap.type == "gap" and json.loads(gap.data) == {"reason": "expired"}
    assert gap.last_event_id == f"{EPOCH}-{T0 * 1000 + 5}-0"
    b.read(stream.append(DETAIL, b'{"n":6}'))
    assert details(on_b) == ['{"n":6}']


def test_an_id_of_a_replaced_stream_is_a_gap_at_once() -> None:
    c, stream = clock(), Stream()
    b = Node(c, stream, 0)
    b.read(stream.append(DETAIL, b"{}"))
    on_b = b.subscribe("/subscribe/details/2665", f"fedcba9876543210-{T0 * 1000}-0")
    assert on_b.head[1]["x-sse-gap"] == "replaced"
    assert json.loads(on_b.events()[0].data) == {"reason": "replaced"}


def test_redis_unreachable_while_reading_is_a_gap_not_a_hang() -> None:
    c, stream = clock(), Stream()
    entries = [stream.append(DETAIL, b'{"n":%d}' % n) for n in range(1, 4)]
    b = Node(c, stream, entries[1][0])
    b.read(entries[2])
    on_b = b.subscribe("/subscribe/details/2665", f"{EPOCH}-{T0 * 1000 + 1}-0")
    stream.fail()
    assert json.loads(on_b.events()[0].data) == {"reason": "unavailable"}
    b.read(stream.append(DETAIL, b'{"n":4}'))
    assert details(on_b) == ['{"n":4}']


def test_what_arrives_while_reading_is_held_up_to_the_queue_bound() -> None:
    c, stream = clock(), Stream()
    entries = [stream.append(DETAIL, b'{"n":%d}' % n) for n in range(1, 4)]
    b = Node(c, stream, entries[1][0])
    b.read(entries[2])
    on_b = b.subscribe("/subscribe/details/2665", f"{EPOCH}-{T0 * 1000 + 1}-0",
                       max_queue=2000)
    for n in range(40):  # 40 x ~80 bytes arrive before the stream answers
        b.read(stream.append(DETAIL, b'{"n":%d}' % (100 + n)))
    gap = on_b.events()[0]
    assert gap.type == "gap" and json.loads(gap.data) == {"reason": "expired"}
    stream.answer()  # too late: nothing more, nothing twice
    later = details(on_b)
    b.read(stream.append(DETAIL, b'{"n":999}'))
    assert details(on_b) == [*later, '{"n":999}']


def test_a_resume_before_the_stream_is_first_read_keeps_the_clients_own_id() -> None:
    journal = Journal(clock(), positions=True)
    resume = journal.resume("/details/2665", f"{EPOCH}-{T0 * 1000}-0", 1 << 20)
    assert resume.gap == "unavailable"
    (frame,) = resume.frames
    assert not frame.startswith(b"id:")  # an EventSource keeps the ID it had


def test_a_resume_from_the_stream_keeps_to_the_count_bound() -> None:
    c, stream = clock(), Stream()
    entries = [stream.append(DETAIL, b'{"n":%d}' % n) for n in range(1, 8)]
    b = Node(c, stream, entries[5][0])
    b.journal = Journal(c, positions=True, max_events=4)  # --replay-events 4
    b.router = Router(b.hub, b.summarizer, raw_stream=True, journal=b.journal)
    b.recall = Recall(stream, b.journal, event_of=b.router.event_of, hit_of=hit_of,
                      max_entries=10_000)
    b.router.start(EPOCH, entries[5][0])
    b.read(entries[6])
    six = b.subscribe("/subscribe/details/2665", f"{EPOCH}-{T0 * 1000 + 1}-0")
    four = b.subscribe("/subscribe/details/2665", f"{EPOCH}-{T0 * 1000 + 3}-0")
    stream.answer()
    assert json.loads(six.events()[0].data) == {"reason": "expired"}  # 6 events > 4
    assert details(four) == ['{"n":4}', '{"n":5}', '{"n":6}', '{"n":7}']


def test_an_id_from_the_future_is_invalid_not_a_silent_wait() -> None:
    c, stream = clock(), Stream()
    b = Node(c, stream, 0)
    b.read(stream.append(DETAIL, b"{}"))
    ahead = int((c.seconds() + 3600) * 1000)
    on_b = b.subscribe("/subscribe/details/2665", f"{EPOCH}-{ahead}-0")
    assert on_b.head[1]["x-sse-gap"] == "invalid"
    b.read(stream.append(DETAIL, b'{"n":1}'))
    assert details(on_b) == ['{"n":1}']
