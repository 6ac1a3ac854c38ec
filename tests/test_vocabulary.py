"""The shared vocabulary: the contract's names, the ID pattern, lineage, and that a
message on a channel reaches the namespace named for it (pure logic, no I/O)."""

from __future__ import annotations

import json
from dataclasses import replace
from fnmatch import fnmatchcase

import pytest
from twisted.internet.task import Clock

from emojistream.config import Settings
from emojistream.hub import Hub
from emojistream.router import Router
from emojistream.summarizer import ScoreSummarizer
from emojistream.vocabulary import (
    DETAIL_CHANNEL_PREFIX,
    DETAIL_NAMESPACE_PREFIX,
    DETAIL_PATTERN,
    DETAILS_NAMESPACE,
    EPS_NAMESPACE,
    ID_PATTERN,
    KIOSK_CHANNEL_PREFIX,
    KIOSK_NAMESPACE,
    KIOSK_PATTERN,
    POOLS,
    RAW_NAMESPACE,
    SCORE_CHANNEL,
    SCORE_KEY,
    SCORE_KINDS,
    SUBSCRIBE,
    Kind,
    detail_namespace,
    lineage,
)
from emojistream.web import StreamRoutes, StreamSettings


def test_the_names_are_the_contracts_bytes():
    # What feeders, clients and dashboards already use: a rename must not change them.
    assert SCORE_CHANNEL == b"stream.score_updates"
    assert DETAIL_PATTERN == b"stream.tweet_updates.*"
    assert KIOSK_PATTERN == b"stream.interaction.*"
    assert SCORE_KEY == "emojitrack_score"
    assert (SUBSCRIBE, EPS_NAMESPACE, RAW_NAMESPACE, DETAILS_NAMESPACE, KIOSK_NAMESPACE) == (
        "/subscribe", "/eps", "/raw", "/details", "/kiosk_interaction")
    assert detail_namespace("2665") == "/details/2665"
    assert DETAIL_CHANNEL_PREFIX == b"stream.tweet_updates."
    assert KIOSK_CHANNEL_PREFIX == b"stream.interaction."


def test_kinds_are_plain_strings_wherever_they_are_written():
    assert POOLS == ("eps", "raw", "detail", "kiosk")
    assert all(type(kind) is Kind and isinstance(kind, str) for kind in POOLS)
    assert sorted(SCORE_KINDS) == ["eps", "raw"]
    # Graphite names, status JSON and dict lookups by the plain string see the value.
    assert f"stream.{Kind.DETAIL}.clients" == "stream.detail.clients"
    assert json.dumps({Kind.EPS: 1, "x": Kind.KIOSK}) == '{"eps": 1, "x": "kiosk"}'
    assert dict.fromkeys(POOLS, 0)["raw"] == 0
    assert str(Kind.RAW) == "raw"


@pytest.mark.parametrize("emoji_id", ["2665", "1F1FA-1F1F8", "a_b", "x", "0" * 64])
def test_the_id_pattern_accepts(emoji_id: str):
    assert ID_PATTERN.fullmatch(emoji_id)


@pytest.mark.parametrize("emoji_id", [
    "", "0" * 65, "26 65", "26/65", "../2665", "%32", "2665\n", "2665.", "caf\u00e9", "*",
])
def test_the_id_pattern_refuses(emoji_id: str):
    assert not ID_PATTERN.fullmatch(emoji_id)


def test_lineage_stops_at_slash_boundaries():
    assert lineage("/details/2665") == ["/details/2665", "/details"]
    assert lineage("/eps") == ["/eps"]
    assert lineage("/a/b/c") == ["/a/b/c", "/a/b", "/a"]
    assert lineage("/details/26") == ["/details/26", "/details"]
    assert "/details/26" not in lineage("/details/2665")


def test_each_namespace_is_served_under_subscribe():
    settings = StreamSettings.of(replace(Settings(), kiosk_stream=True))
    rules = {route.rule for route in StreamRoutes(Hub(Clock()), settings, clock=Clock()).routes()}
    for namespace in (EPS_NAMESPACE, RAW_NAMESPACE, DETAILS_NAMESPACE, KIOSK_NAMESPACE):
        assert SUBSCRIBE + namespace in rules
    assert SUBSCRIBE + DETAIL_NAMESPACE_PREFIX + "<path:emoji_id>" in rules


class RecordingHub:
    def __init__(self) -> None:
        self.published: list[str] = []

    def publish(self, namespace: str, frame: bytes) -> int:
        self.published.append(namespace)
        return 1


def route(channel: bytes, payload: bytes) -> tuple[list[str], dict[str, int]]:
    """The namespaces a real router publishes one message on, and the hits it counts."""
    hub = RecordingHub()
    summarizer = ScoreSummarizer(lambda counts, frame: None)
    router = Router(hub, summarizer, raw_stream=True,  # type: ignore[arg-type]
                    kiosk_stream=True)
    router.message(channel, payload)
    assert router.dropped == 0
    return hub.published, summarizer.pending()


@pytest.mark.parametrize("emoji_id", ["2665", "1F1FA-1F1F8", "x_" * 32])
def test_a_detail_channel_reaches_its_namespace_and_details(emoji_id: str):
    channel = DETAIL_CHANNEL_PREFIX + emoji_id.encode()
    assert fnmatchcase(channel.decode(), DETAIL_PATTERN.decode())
    assert not fnmatchcase(channel.decode(), KIOSK_PATTERN.decode())
    published, _ = route(channel, b'{"id":1}')
    assert published == [detail_namespace(emoji_id)]
    assert lineage(published[0]) == [detail_namespace(emoji_id), DETAILS_NAMESPACE]
    assert channel[len(DETAIL_CHANNEL_PREFIX):].decode() == emoji_id


def test_a_score_hit_counts_for_eps_and_goes_out_on_raw():
    assert not fnmatchcase(SCORE_CHANNEL.decode(), DETAIL_PATTERN.decode())
    published, pending = route(SCORE_CHANNEL, b"2665")
    assert published == [RAW_NAMESPACE]
    assert pending == {"2665": 1}


def test_a_kiosk_channel_reaches_the_kiosk_namespace():
    channel = KIOSK_CHANNEL_PREFIX + b"lobby-1"
    assert fnmatchcase(channel.decode(), KIOSK_PATTERN.decode())
    assert route(channel, b"tap")[0] == [KIOSK_NAMESPACE]
