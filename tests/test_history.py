"""The shared history's format (emojistream.history), pure: entries, IDs, keys, the
scripts' calls and the takeover alignment. What the scripts do in Redis is tested on
a real one in tests/test_bridge.py."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emojistream.history import (
    ACQUIRE_SCRIPT,
    APPEND_SCRIPT,
    DEFAULT_MAXLEN,
    DEFAULT_STREAM_KEY,
    RELEASE_SCRIPT,
    EntryId,
    align,
    append_call,
    decode_entry,
    encode_entry,
    epoch_key,
    lease_key,
    parse_entry_id,
    parse_stream_key,
    release_channel,
    sha1,
)


def test_the_default_keys_and_channel():
    assert DEFAULT_STREAM_KEY == "emojistream:events"
    assert epoch_key(DEFAULT_STREAM_KEY) == "emojistream:events:epoch"
    assert lease_key(DEFAULT_STREAM_KEY) == "emojistream:events:bridge"
    assert release_channel(DEFAULT_STREAM_KEY) == b"emojistream:events:bridge"


def test_the_default_length_is_an_hour_of_400_hits_a_second_two_messages_each():
    assert DEFAULT_MAXLEN == 400 * 2 * 3600


@pytest.mark.parametrize("key", ["emojistream:events", "{emojistream}:events", "a",
                                 "x" * 200, "  spaced-at-the-ends  "])
def test_stream_keys_accepted(key):
    assert parse_stream_key(key) == key.strip()


@pytest.mark.parametrize("key", ["", " ", "has space", "new\nline", "x" * 201, "é"])
def test_stream_keys_refused_in_one_line(key):
    with pytest.raises(ValueError) as raised:
        parse_stream_key(key)
    assert "\n" not in str(raised.value).replace("\\n", "")


def test_an_entry_is_exactly_c_and_p():
    fields = encode_entry(b"stream.tweet_updates.2665", b'{"text":"\xe2\x99\xa5"}')
    assert fields == [b"c", b"stream.tweet_updates.2665", b"p", b'{"text":"\xe2\x99\xa5"}']
    assert decode_entry(fields) == (b"stream.tweet_updates.2665", b'{"text":"\xe2\x99\xa5"}')


@given(st.binary(), st.binary())
def test_entries_round_trip_any_bytes(channel, payload):
    assert decode_entry(encode_entry(channel, payload)) == (channel, payload)


@pytest.mark.parametrize("fields", [
    [], [b"c", b"x"], [b"p", b"x", b"c", b"y"], [b"c", b"x", b"p", b"y", b"z", b"w"],
    [b"c", 1, b"p", b"y"], [b"channel", b"x", b"payload", b"y"],
])
def test_other_writers_entries_are_refused(fields):
    with pytest.raises(ValueError):
        decode_entry(fields)


def test_entry_ids_parse_and_order_as_redis_orders_them():
    assert parse_entry_id(b"1700000000000-5") == EntryId(1700000000000, 5)
    assert str(parse_entry_id("1-0")) == "1-0"
    assert parse_entry_id(b"2-0") > parse_entry_id(b"1-99") > parse_entry_id(b"1-9")
    assert EntryId(3, 4).encode() == b"3-4"
    for bad in (b"", b"1", b"1-", b"-1", b"a-1", b"1-1-1", b"18446744073709551616-0"):
        with pytest.raises(ValueError):
            parse_entry_id(bad)


def test_the_scripts_digests_are_what_evalsha_names():
    for script in (APPEND_SCRIPT, ACQUIRE_SCRIPT, RELEASE_SCRIPT):
        assert sha1(script) == hashlib.sha1(script.encode()).hexdigest()


def test_an_append_call_fenced_and_not():
    messages = [(b"stream.score_updates", b"2665"), (b"stream.tweet_updates.2665", b"{}")]
    keys, args = append_call("k", messages, maxlen=10, epoch_token="t", holder="me")
    assert keys == ["k", "k:epoch", "k:bridge"]
    assert args == [10, "t", "me", b"stream.score_updates", b"2665",
                    b"stream.tweet_updates.2665", b"{}"]
    keys, args = append_call("k", messages[:1], maxlen=10, epoch_token="t")
    assert keys == ["k", "k:epoch"]
    assert args == [10, "t", "", b"stream.score_updates", b"2665"]


def score(n: int) -> tuple[bytes, bytes]:
    return (b"stream.score_updates", str(n).encode())


def test_align_finds_where_the_stream_ends_in_what_was_heard():
    heard = [score(n) for n in range(10)]
    assert align(heard, heard[:4]) == 4
    assert align(heard, heard[6:9]) == 9
    assert align(heard, heard) == 10
    # The tail's older entries fell before what was heard: compared as far as both go,
    # if that is 8 entries at least (or the whole tail).
    assert align(heard[1:], heard[:9]) == 8
    assert align(heard[2:], heard[:9]) is None
    assert align(heard[2:], heard[:9], least=7) == 7
    assert align(heard[8:], heard[:9], least=1) == 1


def test_align_takes_no_coincidence_at_the_start_of_what_was_heard():
    """A bridge that starts anew hears a common score update first: the stream's last
    entry before the start may be the same ID; it is not taken for that entry."""
    tail = [score(n) for n in range(10)] + [score(2665)]
    heard = [score(2665), score(1), score(2)]
    assert align(heard, tail) is None


def test_align_with_an_empty_tail_appends_everything():
    assert align([score(1)], []) == 0


def test_align_without_the_newest_entry_says_none():
    heard = [score(n) for n in range(10)]
    assert align(heard, [score(11)]) is None
    assert align([], [score(1)]) is None
    # The newest is there, but what precedes it in the stream was not heard before it.
    assert align(heard, [score(3), score(5)]) is None


def test_align_takes_the_latest_run_when_a_run_was_heard_twice():
    """The documented risk: a repeated run of tail length is taken at its latest; the
    messages between are lost, never appended twice."""
    run = [score(1), score(2), score(3)]
    heard = [score(0), *run, score(7), *run, score(8)]
    assert align(heard, run) == 8
    # One more entry of tail tells them apart.
    assert align(heard, [score(0), *run]) == 4


# A stream of one entry has a tail of one score update: the documented risk above.
@given(st.integers(0, 600).filter(lambda cut: cut != 1), st.integers(2, 64),
       st.integers(0, 2**32))
def test_align_of_a_random_history_is_exact(cut, tail_length, seed):
    """Emoji IDs drawn at random and unique detail payloads, as the feeder sends them:
    wherever the stream ends, a tail of two or more entries (so one detail update at
    least) finds the rest exactly. (One score entry alone would match its latest
    repetition: the bridge reads 64.)"""
    rng = random.Random(seed)
    heard = []
    for n in range(300):
        emoji = str(rng.randrange(20)).encode()
        heard.append((b"stream.score_updates", emoji))
        heard.append((b"stream.tweet_updates." + emoji, b'{"id":%d}' % n))
    stream = heard[:cut]
    assert align(heard, stream[-tail_length:]) == (cut if stream else 0)
