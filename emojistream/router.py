"""What a Redis pub/sub message means: which namespace hears it, encoded how."""

from __future__ import annotations

import re

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from emojistream.batching import Batcher
from emojistream.delays import DeliveryDelays
from emojistream.hub import Hub
from emojistream.replay import Journal
from emojistream.sse import encode_event
from emojistream.summarizer import ScoreSummarizer
from emojistream.vocabulary import (
    DETAIL_CHANNEL_PREFIX,
    DETAIL_NAMESPACE_PREFIX,
    ID_PATTERN,
    KIOSK_CHANNEL_PREFIX,
    KIOSK_NAMESPACE,
    RAW_NAMESPACE,
    SCORE_CHANNEL,
)


def valid_utf8(payload: bytes) -> bytes:
    """The payload itself if it is UTF-8, else with each bad byte replaced by U+FFFD.

    Streams are declared C{charset=utf-8}; passing invalid bytes on would make each
    browser repair them its own way.
    """
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.decode("utf-8", "replace").encode("utf-8")
    return payload


_PUBLISHED_AT = b'"published_at":'
_NUMBER = re.compile(rb"\s*([0-9]{9,11}(?:\.[0-9]{1,9})?)")


def published_at(payload: bytes) -> float | None:
    """The publish time (Unix seconds) a detail payload carries as a top-level
    C{"published_at"} number, if a feeder adds one; else None (emojitracker's feeder
    does not: C{created_at} is the tweet's own time, to the second)."""
    at = payload.find(_PUBLISHED_AT)
    if at < 0:
        return None
    match = _NUMBER.match(payload, at + len(_PUBLISHED_AT))
    return float(match.group(1)) if match else None


def hit_of(raw: bytes) -> str | None:
    """C{raw} as an emoji ID (a score update's payload, a detail channel's end), or
    None if it is not one."""
    emoji_id = raw.decode("ascii", "replace")
    return emoji_id if ID_PATTERN.fullmatch(emoji_id) else None


class Router:
    """Turns (channel, payload) from Redis into hub broadcasts and summarizer hits.

    It owns the bracket of one read from Redis (L{read_started}, L{read_done}).
    Within one read the /raw broadcasts, which go to every raw client, wait until the
    read's detail updates, which go to a few clients each, are out: a detail update
    does not queue behind a fan-out to hundreds. Each stream still gets its messages
    in order.
    """

    log = Logger()

    def __init__(self, hub: Hub, summarizer: ScoreSummarizer, *, raw_stream: bool,
                 kiosk_stream: bool = False, max_payload: int = 65536,
                 batcher: Batcher | None = None, journal: Journal | None = None,
                 clock: IReactorTime | None = None,
                 delays: DeliveryDelays | None = None) -> None:
        self._hub = hub
        # With both: how long a read's detail updates take to be written, from their
        # publication when the payload says when, else from the read.
        self._clock = clock if delays is not None else None
        self._delays = delays
        self._read_at = 0.0
        self._details_in_read = 0
        self._published_in_read: list[float] = []
        # With event IDs (--event-ids), every event is encoded and kept by the journal.
        self._journal = journal
        self._batcher = batcher
        self._max_payload = max_payload
        self._summarizer = summarizer
        self._raw_stream = raw_stream
        self._kiosk_stream = kiosk_stream
        #: Messages received from Redis since start.
        self.received = 0
        #: Messages dropped because their channel or payload made no sense.
        self.dropped = 0
        #: Of those, the ones dropped for a payload over C{max_payload} bytes.
        self.oversized = 0
        # /raw frames of the read in progress; None outside a read.
        self._raw_later: list[bytes] | None = None

    def read_started(self) -> None:
        """Messages of one read from Redis follow: a stream's second and later
        messages of the read wait for its end (the batcher's round)."""
        self._raw_later = []
        if self._clock is not None:
            self._read_at = self._clock.seconds()
            self._details_in_read = 0
            self._published_in_read = []
        if self._batcher is not None:
            self._batcher.begin_round()

    def read_done(self) -> None:
        """The read's messages are handled: now its /raw broadcasts, in order, then
        what the read held back for each stream, in one write per stream."""
        frames, self._raw_later = self._raw_later, None
        try:
            for frame in frames or ():
                self._hub.publish(RAW_NAMESPACE, frame)
        finally:
            if self._batcher is not None:
                self._batcher.end_round()
            if self._clock is not None:
                self._observe_delays()

    def _observe_delays(self) -> None:
        assert self._clock is not None and self._delays is not None
        now = self._clock.seconds()
        if self._details_in_read:
            self._delays.since_read.observe(now - self._read_at, self._details_in_read)
        for published in self._published_in_read:
            self._delays.since_publish.observe(max(0.0, now - published))

    def start(self, epoch: str, since: int) -> None:
        """A stream source starts (L{emojistream.history.StreamHandler}): event IDs
        are its positions from now on."""
        if self._journal is not None:
            self._journal.start(epoch, since)

    def message(self, channel: bytes, payload: bytes, place: int | None = None) -> None:
        """Handle one message (from a stream source: at position C{place}, which its
        events' IDs are made of)."""
        if place is not None and self._journal is not None:
            self._journal.at(place)
        self.received += 1
        if channel == SCORE_CHANNEL:
            self.score(payload)
            return
        routed = self.event_of(channel, payload)
        if routed is None:
            self.dropped += 1
            if len(payload) > self._max_payload:
                self.oversized += 1
            return
        namespace, data, event = routed
        if self._clock is not None and channel.startswith(DETAIL_CHANNEL_PREFIX):
            published = published_at(payload)
            if published is None:
                self._details_in_read += 1
            else:
                self._published_in_read.append(published)
        self._hub.publish(namespace, self._frame(namespace, data, event))

    def event_of(self, channel: bytes, payload: bytes
                 ) -> tuple[str, bytes, bytes | None] | None:
        """What a message is to the clients that hear it: (namespace, data, event
        name), or None if it is nothing to them (a channel or ID that makes no sense,
        a payload over C{max_payload}, a stream that is off). A score update is
        /raw's event (with --raw-stream); its hit is L{hit_of}. Used for live
        messages and for those a resume reads from the stream alike."""
        if channel == SCORE_CHANNEL:
            if self._raw_stream and hit_of(payload) is not None:
                return RAW_NAMESPACE, payload, None
            return None
        if len(payload) > self._max_payload:
            return None
        if channel.startswith(DETAIL_CHANNEL_PREFIX):
            emoji_id = hit_of(channel[len(DETAIL_CHANNEL_PREFIX):])
            if emoji_id is None:
                return None
            return DETAIL_NAMESPACE_PREFIX + emoji_id, valid_utf8(payload), channel
        if (self._kiosk_stream and channel.startswith(KIOSK_CHANNEL_PREFIX)
                and b"\n" not in channel and b"\r" not in channel):
            # Made valid UTF-8 like the payload: the stream is declared UTF-8.
            return KIOSK_NAMESPACE, valid_utf8(payload), valid_utf8(channel)
        return None

    def score(self, payload: bytes) -> None:
        """One hit: counted for C{/eps}, and sent on C{/raw} when that stream is on."""
        emoji_id = hit_of(payload)
        if emoji_id is None:
            self.dropped += 1
            return
        self._summarizer.hit(emoji_id)
        if self._raw_stream:
            frame = self._frame(RAW_NAMESPACE, payload)
            if self._raw_later is not None:
                self._raw_later.append(frame)
            else:
                self._hub.publish(RAW_NAMESPACE, frame)

    def _frame(self, namespace: str, data: bytes, event: bytes | None = None) -> bytes:
        """The SSE message, encoded once; with event IDs, numbered and kept by the
        journal for resuming clients."""
        journal = self._journal
        if journal is None:
            return encode_event(data, event)
        return journal.event(namespace, data, event)
