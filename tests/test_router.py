"""The router's order of broadcasts within one read from Redis (pure logic, no I/O)."""

from __future__ import annotations

from emojistream.router import Router
from emojistream.summarizer import ScoreSummarizer


class RecordingHub:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, namespace: str, frame: bytes) -> int:
        self.published.append((namespace, frame))
        return 1


def make_router() -> tuple[Router, RecordingHub, ScoreSummarizer]:
    hub = RecordingHub()
    summarizer = ScoreSummarizer(lambda counts, frame: None)
    return Router(hub, summarizer, raw_stream=True), hub, summarizer  # type: ignore[arg-type]


def test_within_a_read_raw_broadcasts_follow_the_detail_updates_in_order():
    router, hub, summarizer = make_router()
    router.read_started()
    for emoji_id in (b"2665", b"1F602"):
        router.message(b"stream.score_updates", emoji_id)
        router.message(b"stream.tweet_updates." + emoji_id, b"{\"id\":" + emoji_id + b"}")
    # Hits count at once; only the raw broadcasts wait.
    assert summarizer.pending() == {"2665": 1, "1F602": 1}
    assert [ns for ns, _ in hub.published] == ["/details/2665", "/details/1F602"]
    router.read_done()
    assert hub.published[2:] == [("/raw", b"data:2665\n\n"), ("/raw", b"data:1F602\n\n")]


def test_outside_a_read_a_raw_broadcast_goes_at_once():
    router, hub, _ = make_router()
    router.message(b"stream.score_updates", b"2665")
    assert hub.published == [("/raw", b"data:2665\n\n")]
    router.read_started()
    router.read_done()
    assert len(hub.published) == 1
