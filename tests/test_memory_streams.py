"""What the SSE streams send, decided in code and driven in memory (tests/memory.py):
delivery by namespace and order, the raw stream's exact bytes, IDs kept as strings,
line breaks as data lines, keepalives on the clock. test_streams.py keeps the real
Redis and HTTP tests (headers on the wire, HEAD, sums across real ticks, hang-ups,
keepalives in real time, the demo feeder)."""

from __future__ import annotations

import json
import re

from twisted.application.internet import TimerService

from emojistream.sse import KEEPALIVE
from memory import MemoryDaemon
from sseclient import response_events


def test_details_are_delivered_per_id_in_order_and_to_ancestors() -> None:
    d = MemoryDaemon()
    only_a, every, prefix = d.connect(), d.connect(), d.connect()
    only_a.get("/subscribe/details/A")
    every.get("/subscribe/details")
    prefix.get("/subscribe/details/A1")
    sent = []
    for i in range(20):
        for emoji_id in ("A", "B"):
            payload = json.dumps({"id": emoji_id, "seq": i})
            sent.append((emoji_id, payload))
            d.publish(f"stream.tweet_updates.{emoji_id}".encode(), payload.encode())
    assert [(e.type, e.data) for e in only_a.events()] == [
        (f"stream.tweet_updates.{i}", p) for i, p in sent if i == "A"]
    assert [(e.type, e.data) for e in every.events()] == [
        (f"stream.tweet_updates.{i}", p) for i, p in sent]
    # The wire format is exactly event: then data:, no id: field.
    first = sent[0][1].encode()
    assert only_a.body.startswith(b"event:stream.tweet_updates.A\ndata:" + first + b"\n\n")
    assert b"\nid:" not in every.body and not every.body.startswith(b"id:")
    # /details/A1 is not an ancestor of /details/A, nor the other way round.
    assert prefix.events() == []


def test_raw_stream_sends_one_message_per_hit_in_order() -> None:
    d = MemoryDaemon()
    raw = d.connect()
    raw.get("/subscribe/raw")
    ids = ["2665", "1F602", "2764", "2665", "1F1FA-1F1F8"]
    for emoji_id in ids:
        d.publish(b"stream.score_updates", emoji_id.encode())
    assert [e.data for e in raw.events()] == ids
    assert raw.body == b"".join(b"data:%s\n\n" % i.encode() for i in ids)


def test_ids_stay_exact_strings() -> None:
    # "2764" must not become the number 2764 (nor "0031-20E3" anything else).
    d = MemoryDaemon()
    raw, eps = d.connect(), d.connect()
    raw.get("/subscribe/raw")
    eps.get("/subscribe/eps")
    for emoji_id in ("2764", "0031-20E3", "00A9"):
        d.publish(b"stream.score_updates", emoji_id.encode())
    d.app.summarizer.tick()
    d.flush()
    assert [e.data for e in raw.events()] == ["2764", "0031-20E3", "00A9"]
    [summary] = eps.events()
    assert json.loads(summary.data) == {"2764": 1, "0031-20E3": 1, "00A9": 1}


def test_line_breaks_in_payloads_become_data_lines() -> None:
    d = MemoryDaemon()
    reader = d.connect()
    reader.get("/subscribe/details/X")
    payloads = ["one\ntwo\rthree\r\nfour", "event:evil\ndata:injected\n\nretry:1\nid:7",
                "\r\n\r\n", "trailing\n", " leading space", ""]
    for p in payloads:
        d.publish(b"stream.tweet_updates.X", p.encode())
    parsed = response_events(bytes(reader.received))
    assert [e.data for e in parsed.events] == [
        "\n".join(re.split(r"\r\n|\r|\n", p)) for p in payloads]
    assert {e.type for e in parsed.events} == {"stream.tweet_updates.X"}
    # Nothing but event: and data: fields reached the client.
    assert {name for name, _ in parsed.fields} == {"event", "data"}
    assert parsed.retries == []
    assert all(e.last_event_id == "" for e in parsed.events)
    # The first payload arrives as four data: lines.
    assert b"data:one\ndata:two\ndata:three\ndata:four\n\n" in reader.body


def test_no_stream_goes_longer_than_the_keepalive_interval_without_a_byte() -> None:
    """A message just after a keepalive tick used to leave the stream silent for
    almost two intervals; idle streams get about one keepalive per interval."""
    d = MemoryDaemon({"SSE_KEEPALIVE_SEC": "15"})
    # The daemon's own keepalive timer (the one that sends KEEPALIVE), on its clock.
    (timer,) = [s for s in d.app.core
                if isinstance(s, TimerService) and s.call[1] == (KEEPALIVE,)]
    timer.startService()
    reader = d.connect()
    reader.get("/subscribe/details/2665")

    def comments() -> int:
        return len(response_events(bytes(reader.received)).comments)

    def sync(text: str) -> int:
        d.publish(b"stream.tweet_updates.2665", text.encode())
        assert response_events(bytes(reader.received)).events[-1].data == text
        return comments()

    def advance(seconds: float, step: float = 0.25) -> None:
        for _ in range(round(seconds / step)):
            d.advance(step)

    try:
        advance(3.25)  # just past a tick (every 3 s: five per interval)
        start = sync("written just after a tick")
        advance(15)
        assert sync("15 s later") == start + 1
        assert reader.body.count(KEEPALIVE) == start + 1
        # Idle for a minute: keepalives 12 s apart once the stream went quiet (the
        # first 14.75 s after the last message: at 33, 45, 57 and 69 s), so at least
        # one per 15 s and not many more.
        before = comments()
        advance(60)
        assert sync("a minute later") - before == 4
        before = comments()
        advance(120)  # 93, 105, ... 189 s: 9 where one per 15 s would be 8
        assert sync("two minutes later") - before == 9
    finally:
        timer.stopService()
