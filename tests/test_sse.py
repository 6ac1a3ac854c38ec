"""The SSE encoder against the independent, spec-following parser."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emojistream.sse import KEEPALIVE, encode_comment, encode_event, encode_retry
from ssespec import SpecParser


def parse(data: bytes) -> SpecParser:
    parser = SpecParser()
    parser.feed(data)
    return parser


def lines_of(text: str) -> str:
    return "\n".join(re.split(r"\r\n|\r|\n", text))


def test_plain_messages_are_exactly_the_contract_bytes():
    assert encode_event(b'{"2665":3,"1F602":1}') == b'data:{"2665":3,"1F602":1}\n\n'
    assert encode_event(b'{"a":1}', b"stream.tweet_updates.2665") == (
        b'event:stream.tweet_updates.2665\ndata:{"a":1}\n\n'
    )
    assert encode_retry(100) == b"retry:100\n\n"
    assert KEEPALIVE.startswith(b":")


def test_line_breaks_split_into_data_lines():
    assert encode_event(b"a\nb\rc\r\nd") == b"data:a\ndata:b\ndata:c\ndata:d\n\n"
    assert encode_event(b"") == b"data:\n\n"
    assert encode_event(b"\n") == b"data:\ndata:\n\n"


def test_a_leading_space_survives_the_client_stripping_one():
    assert encode_event(b" x") == b"data:  x\n\n"
    assert parse(encode_event(b" x")).events[0].data == " x"


def test_event_names_with_line_breaks_are_refused():
    with pytest.raises(ValueError):
        encode_event(b"x", b"a\nb")
    with pytest.raises(ValueError):
        encode_event(b"x", b"a\rb")


def test_comments_and_keepalives_dispatch_nothing():
    parser = parse(KEEPALIVE + encode_comment(b"hi\nthere") + encode_retry(5))
    assert parser.events == []
    assert parser.comments == ["", "hi", "there"]
    assert parser.retries == [5]


event_names = st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=30)
payloads = st.text(st.characters(codec="utf-8"), max_size=200)


@given(name=event_names, payload=payloads)
def test_any_event_parses_back_to_exactly_itself(name, payload):
    encoded = encode_event(payload.encode(), name.encode())
    parser = parse(encoded)
    assert len(parser.events) == 1
    event = parser.events[0]
    assert event.type == (name or "message")
    assert event.data == lines_of(payload)
    assert [f for f, _ in parser.fields] == ["event"] + ["data"] * (
        len(re.split(r"\r\n|\r|\n", payload)))
    assert parser.retries == [] and event.last_event_id == ""


@given(st.lists(st.tuples(event_names, payloads), max_size=8),
       st.integers(min_value=1, max_value=50))
def test_a_sequence_of_events_survives_any_chunking(items, chunk):
    stream = b"".join(encode_event(p.encode(), n.encode()) for n, p in items)
    parser = SpecParser()
    for i in range(0, len(stream), chunk):
        parser.feed(stream[i:i + chunk])
    assert [(e.type, e.data) for e in parser.events] == [
        (n or "message", lines_of(p)) for n, p in items
    ]
