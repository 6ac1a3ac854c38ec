"""Resumable streams (--event-ids): the journal's IDs and bounds, and resuming routes,
driven in memory (fast tier). The real-socket, real-Redis resume is in test_resume.py."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from emojistream.replay import EXPIRED, FOREIGN, INVALID, MAX_NAMESPACES, Journal
from memory import MemoryDaemon

EPOCH = "0badcafe"


def journal(clock: Clock | None = None, **bounds: float) -> Journal:
    return Journal(clock or Clock(), epoch=EPOCH, **bounds)  # type: ignore[arg-type]


def sequences(frames: list[bytes]) -> list[int]:
    return [int(f.split(b"\n", 1)[0].rsplit(b"-", 1)[1]) for f in frames]


def test_every_event_gets_the_next_id_of_this_process():
    j = journal()
    assert j.event("/raw", b"2665") == b"id:0badcafe-1\ndata:2665\n\n"
    assert j.event("/details/2665", b"{}", b"stream.tweet_updates.2665") == (
        b"id:0badcafe-2\nevent:stream.tweet_updates.2665\ndata:{}\n\n")
    assert j.summary({"2665": 2}) == b'id:0badcafe-3\ndata:{"2665":2}\n\n'
    assert Journal(Clock()).epoch != Journal(Clock()).epoch  # random per process


def test_a_resume_gets_the_events_after_its_id_of_its_namespace_and_descendants():
    j = journal()
    frames = [j.event(f"/details/{n % 3}", b"%d" % n, b"e") for n in range(1, 10)]
    got = j.resume("/details/1", "0badcafe-1", 1 << 20)
    assert got.gap is None and got.frames == [frames[3], frames[6]]
    everything = j.resume("/details", "0badcafe-4", 1 << 20)
    assert everything.frames == frames[4:]
    assert j.resume("/details/1", f"0badcafe-{9}", 1 << 20).frames == []
    assert j.hits == 3


def test_eps_gets_one_catch_up_summary_of_exactly_the_hits_it_missed():
    j = journal()
    j.summary({"2665": 1})
    j.summary({"2665": 2, "1F602": 1})
    j.event("/raw", b"1F602")
    j.summary({"1F602": 4})
    got = j.resume("/eps", "0badcafe-1", 1 << 20)
    assert len(got.frames) == 1
    assert got.frames[0].startswith(b"id:0badcafe-4\n")
    assert json.loads(got.frames[0].split(b"data:", 1)[1]) == {"2665": 2, "1F602": 5}
    assert j.resume("/eps", "0badcafe-4", 1 << 20).frames == []  # never {}


def test_a_gap_that_cannot_be_filled_is_said_with_an_id_to_go_on_from():
    clock = Clock()
    j = journal(clock, max_events=3, max_age=60)
    for n in range(5):
        j.event("/raw", b"%d" % n)
    too_old = j.resume("/raw", "0badcafe-1", 1 << 20)  # 2 was given up
    assert too_old.gap == EXPIRED
    assert too_old.frames == [b'id:0badcafe-5\nevent:gap\ndata:{"reason":"expired"}\n\n']
    assert j.resume("/raw", "0badcafe-2", 1 << 20).frames == sequences_frames(j, 3, 5)
    assert j.resume("/raw", "deadbeef-3", 1 << 20).gap == FOREIGN
    for nonsense in ("0badcafe-99", "", "x-1", "0badcafe-1\nevent:x"):
        assert j.resume("/raw", nonsense, 1 << 20).gap == INVALID
    clock.advance(61)  # the age bound, without new events
    assert j.resume("/raw", "0badcafe-4", 1 << 20).gap == EXPIRED
    assert j.misses == {EXPIRED: 2, FOREIGN: 1, INVALID: 4}
    # More than the client may be sent at once is a gap too.
    assert j.resume("/raw", "0badcafe-5", 0).gap is None
    j.event("/raw", b"x")
    assert j.resume("/raw", "0badcafe-5", 5).gap == EXPIRED


def sequences_frames(j: Journal, first: int, last: int) -> list[bytes]:
    got = j.resume("/raw", f"0badcafe-{first - 1}", 1 << 20).frames
    assert sequences(got) == list(range(first, last + 1))
    return got


def test_memory_is_bounded_and_the_largest_buffer_gives_way_first():
    j = journal(max_bytes=50_000)
    j.event("/details/quiet", b"q" * 100, b"e")
    for _ in range(5000):
        j.event("/raw", b"2665")
    assert j.size <= 50_000
    # The quiet namespace kept its event; the busy one gave up its oldest.
    assert j.resume("/details/quiet", "0badcafe-0", 1 << 20).frames[0].endswith(
        b"q" * 100 + b"\n\n")
    assert j.resume("/raw", "0badcafe-2", 1 << 20).gap == EXPIRED


def test_a_quiet_id_resumes_without_a_gap_after_more_namespaces_than_the_bound():
    """Issue 18 item 4: /raw's buffer, made first and busy, was forgotten for the
    20,001st namespace and its newest ID became a floor for every namespace."""
    j = journal()
    j.event("/raw", b"2665")
    first = j.event("/details/QUIET", b"1", b"e")
    second = j.event("/details/QUIET", b"2", b"e")
    for n in range(MAX_NAMESPACES - 1):  # a hit and its detail, as the feeder sends
        j.event("/raw", b"%X" % n)
        j.event(f"/details/{n:X}", b"{}", b"e")
    assert j.resume("/details/QUIET", j.event_id(3), 1 << 20).frames == []
    assert j.resume("/details/QUIET", j.event_id(2), 1 << 20).frames == [second]
    assert j.resume("/details/QUIET", j.event_id(1), 1 << 20).frames == [first, second]
    # The busy /raw kept its buffer; the ID that was forgotten (the first of the 19,999,
    # written to once, longest ago) reports a gap only before its own event.
    assert j.resume("/raw", j.event_id(j._sequence - 2), 1 << 20).gap is None
    assert j.resume("/details/0", j.event_id(5), 1 << 20).frames == []
    assert j.resume("/details/0", j.event_id(4), 1 << 20).gap == EXPIRED
    assert j.misses[EXPIRED] == 1


def test_a_forgotten_namespace_reports_a_gap_only_for_what_it_gave_up():
    j = journal(max_namespaces=2)
    a1, a2 = j.event("/details/a", b"1", b"e"), j.event("/details/a", b"2", b"e")
    j.event("/details/b", b"3", b"e")  # written to once: forgotten before a, which is spared
    c4 = j.event("/details/c", b"4", b"e")
    assert j.resume("/details/a", j.event_id(0), 1 << 20).frames == [a1, a2]
    assert j.resume("/details/b", j.event_id(3), 1 << 20).frames == []
    assert j.resume("/details/b", j.event_id(2), 1 << 20).gap == EXPIRED
    assert j.resume("/details", j.event_id(2), 1 << 20).gap == EXPIRED
    assert j.resume("/details", j.event_id(3), 1 << 20).frames == [c4]
    # Written to again, b remembers what it gave up before.
    b5 = j.event("/details/b", b"5", b"e")
    assert j.resume("/details/b", j.event_id(2), 1 << 20).gap == EXPIRED
    assert j.resume("/details/b", j.event_id(3), 1 << 20).frames == [b5]
    assert j.resume("/details", j.event_id(2), 1 << 20).gap == EXPIRED


def test_forgotten_floors_are_bounded_and_the_oldest_fold_into_one():
    j = journal(max_namespaces=1, max_floors=1)
    j.event("/details/a", b"1", b"e")
    j.event("/details/b", b"2", b"e")  # a forgotten: its floor 1
    c3 = j.event("/details/c", b"3", b"e")  # b forgotten: its floor 2; a's is folded
    assert len(j._floors) == 1
    assert j.resume("/details/b", j.event_id(2), 1 << 20).frames == []
    assert j.resume("/details/b", j.event_id(1), 1 << 20).gap == EXPIRED
    assert j.resume("/details/c", j.event_id(2), 1 << 20).frames == [c3]
    # A namespace it no longer knows (a, or one never seen): a gap before the fold.
    for unknown in ("/details/a", "/details/z"):
        assert j.resume(unknown, j.event_id(1), 1 << 20).frames == []
        assert j.resume(unknown, j.event_id(0), 1 << 20).gap == EXPIRED
    # /details keeps the newest of everything forgotten below it.
    assert j.resume("/details", j.event_id(1), 1 << 20).gap == EXPIRED
    assert j.resume("/details", j.event_id(2), 1 << 20).frames == [c3]


def test_what_forgotten_namespaces_leave_behind_stays_bounded():
    import tracemalloc

    def held(namespaces: int) -> int:
        j = journal(max_namespaces=1000, max_floors=1000)
        tracemalloc.start()
        try:
            for n in range(namespaces):
                j.event(f"/details/{n:X}", b"{}", b"e")
            assert len(j._buffers) == len(j._floors) == 1000
            return tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    # What a first use allocates once (caches, interned strings) is not what is
    # measured: warm up first.
    held(2_000)
    # Twice as many namespaces through the journal hold no more memory (a pointer left
    # behind per forgotten namespace would be 80 KB more).
    assert held(20_000) <= held(10_000) + 16384


NAMESPACES = ("/raw", "/details", "/details/a", "/details/b", "/details/b/x",
              "/details/c", "/kiosk_interaction")
PUBLISH = st.tuples(st.sampled_from(NAMESPACES), st.integers(0, 200),
                    st.sampled_from([0.0, 0.0, 1.0, 20.0]))
RESUME = st.tuples(st.sampled_from((*NAMESPACES, "/details/d")), st.floats(0, 1))


@settings(max_examples=400, deadline=None)
@given(ops=st.lists(st.one_of(PUBLISH, RESUME), max_size=60),
       max_events=st.integers(1, 6), max_age=st.sampled_from([30.0, 1e9]),
       max_bytes=st.integers(300, 3000), max_namespaces=st.integers(1, 5),
       max_floors=st.sampled_from([1, 2, 10**6]))
def test_a_resume_is_a_gap_exactly_when_an_event_it_should_get_was_given_up(
        ops: list[Any], max_events: int, max_age: float, max_bytes: int,
        max_namespaces: int, max_floors: int) -> None:
    """Against a log of everything published: a resume without a gap gets exactly the
    events of its namespace and those below it after its ID; a gap is reported only
    when one of them is no longer held (or, once floors were folded together, the ID
    is older than the fold)."""
    clock = Clock()
    j = journal(clock, max_events=max_events, max_age=max_age, max_bytes=max_bytes,
                max_namespaces=max_namespaces, max_floors=max_floors)
    log: list[tuple[int, str, bytes]] = []
    for op in ops:
        if len(op) == 3:
            namespace, size, later = op
            clock.advance(later)
            frame = j.event(namespace, b"x" * size, b"e")
            log.append((len(log) + 1, namespace, frame))
            assert j.size == sum(e[3] for b in j._buffers.values() for e in b.entries)
            assert j.size <= max_bytes
            assert len(j._buffers) <= max_namespaces and len(j._floors) <= max_floors
            continue
        namespace, where = op
        last = int(where * len(log))
        got = j.resume(namespace, j.event_id(last), 1 << 30)
        held = {e[0] for b in j._buffers.values() for e in b.entries}
        wanted = [(seq, frame) for seq, ns, frame in log
                  if seq > last and (ns == namespace or ns.startswith(namespace + "/"))]
        if got.gap is None:
            assert got.frames == [frame for _, frame in wanted]
        else:
            assert got.gap == EXPIRED
            given_up = any(seq not in held for seq, _ in wanted)
            assert given_up or (max_floors < 10**6 and last < j._floor)


def test_without_event_ids_the_bytes_are_unchanged():
    d = MemoryDaemon()
    raw = d.connect()
    raw.get("/subscribe/raw", headers="Last-Event-ID: 0badcafe-1\r\n")
    d.publish(b"stream.score_updates", b"2665")
    assert raw.received.endswith(b"b\r\ndata:2665\n\n\r\n")
    assert "x-sse-gap" not in raw.head[1]


def test_a_client_resumes_by_header_or_query_with_no_gap_and_no_duplicate():
    d = MemoryDaemon({"SSE_EVENT_IDS": "1"})
    first = d.connect()
    first.get("/subscribe/details/2665")
    d.publish(b"stream.tweet_updates.2665", b'{"n":1}')
    [seen] = first.events()
    assert seen.last_event_id.endswith("-1")
    first.close()
    for n in (2, 3):
        d.publish(b"stream.tweet_updates.2665", b'{"n":%d}' % n)
    by_header, by_query, mercure = d.connect(), d.connect(), d.connect()
    by_header.get("/subscribe/details/2665",
                  headers=f"Last-Event-ID: {seen.last_event_id}\r\n")
    by_query.get(f"/subscribe/details/2665?last_event_id={seen.last_event_id}")
    mercure.get(f"/subscribe/details/2665?lastEventID={seen.last_event_id}")
    d.publish(b"stream.tweet_updates.2665", b'{"n":4}')
    for client in (by_header, by_query, mercure):
        assert [json.loads(e.data)["n"] for e in client.events()] == [2, 3, 4]
        assert "x-sse-gap" not in client.head[1]


def test_a_foreign_id_gets_the_gap_event_and_header_then_live_events():
    d = MemoryDaemon({"SSE_EVENT_IDS": "1"})
    client = d.connect()
    client.get("/subscribe/raw", headers="Last-Event-ID: 12345678-40\r\n")
    d.publish(b"stream.score_updates", b"2665")
    assert client.head[1]["x-sse-gap"] == "foreign"
    gap, live = client.events()
    assert (gap.type, json.loads(gap.data)) == ("gap", {"reason": "foreign"})
    assert live.data == "2665" and live.last_event_id > gap.last_event_id


def test_eps_resumes_with_one_catch_up_summary():
    d = MemoryDaemon({"SSE_EVENT_IDS": "1"})
    eps = d.connect()
    eps.get("/subscribe/eps")
    d.publish(b"stream.score_updates", b"2665")
    d.app.summarizer.tick()
    d.flush()
    [first] = eps.events()
    eps.close()
    for emoji_id in (b"2665", b"1F602", b"1F602"):
        d.publish(b"stream.score_updates", emoji_id)
        d.app.summarizer.tick()
    again = d.connect()
    again.get("/subscribe/eps", headers=f"Last-Event-ID: {first.last_event_id}\r\n")
    d.publish(b"stream.score_updates", b"2665")
    d.app.summarizer.tick()
    d.flush()
    assert [json.loads(e.data) for e in again.events()] == [{"2665": 1, "1F602": 2},
                                                            {"2665": 1}]


def test_a_backed_up_eps_client_gets_the_merged_summary_with_the_newest_id():
    d = MemoryDaemon({"SSE_EVENT_IDS": "1"})
    eps = d.connect()
    eps.get("/subscribe/eps")
    [stream] = d.app.hub.streams()
    stream.writer.pauseProducing()
    for emoji_id in (b"2665", b"1F602"):
        d.publish(b"stream.score_updates", emoji_id)
        d.app.summarizer.tick()
    stream.writer.resumeProducing()
    d.flush()
    [merged] = eps.events()
    assert json.loads(merged.data) == {"2665": 1, "1F602": 1}
    assert merged.last_event_id == d.app.journal.event_id()  # type: ignore[union-attr]


def test_the_memory_bound_counts_what_the_buffers_really_hold():
    import random
    import tracemalloc

    def measured(fill: Any) -> tuple[int, int]:
        tracemalloc.start()
        try:
            j = journal(max_events=10**9, max_bytes=10**12)
            before = tracemalloc.get_traced_memory()[0]
            fill(j)
            return tracemalloc.get_traced_memory()[0] - before, j.size
        finally:
            tracemalloc.stop()

    rng = random.Random(7)

    def details(j: Journal) -> None:
        for i in range(3000):
            j.event(f"/details/{i % 50}", b"x" * 1000, b"e")

    def raw(j: Journal) -> None:
        for _ in range(20000):
            j.event("/raw", b"2665")

    def summaries(j: Journal) -> None:
        for _ in range(5000):
            j.summary({str(rng.randint(1000, 9999)): 1 for _ in range(6)})

    for fill in (details, raw, summaries):
        actual, estimated = measured(fill)
        # Per event the estimate is not short; 64 KiB for what is allocated once.
        assert actual <= estimated + 65536, (fill.__name__, actual, estimated)


def test_kiosk_events_carry_ids_and_resume_too():
    d = MemoryDaemon({"SSE_EVENT_IDS": "1", "ENABLE_KIOSK_INTERACTION_STREAM": "1"})
    kiosk = d.connect()
    kiosk.get("/subscribe/kiosk_interaction")
    d.publish(b"stream.interaction.tap", b"1")
    [first] = kiosk.events()
    assert (first.type, first.data) == ("stream.interaction.tap", "1") and first.last_event_id
    d.publish(b"stream.interaction.tap", b"2")
    again = d.connect()
    again.get("/subscribe/kiosk_interaction", headers=f"Last-Event-ID: {first.last_event_id}\r\n")
    assert [e.data for e in again.events()] == ["2"]
