"""The hub's namespace index, with stand-in streams (pure logic, no I/O)."""

from __future__ import annotations

from emojistream.hub import Hub, lineage


class FakeStream:
    def __init__(self, namespace: str, kind: str = "detail", created_at: float = 0) -> None:
        self.namespace = namespace
        self.kind = kind
        self.created_at = created_at
        self.client_ip = "192.0.2.1"
        self.dropped = False
        self.frames: list[bytes] = []
        self.chunks: list[bytes | None] = []
        self.msgs_sent = 0

    def send(self, frame: bytes, chunked: bytes | None = None) -> None:
        self.frames.append(frame)
        self.chunks.append(chunked)

    def send_control(self, frame: bytes) -> None:
        self.frames.append(frame)


def test_lineage_stops_at_slash_boundaries():
    assert lineage("/details/2665") == ["/details/2665", "/details"]
    assert lineage("/eps") == ["/eps"]
    assert lineage("/a/b/c") == ["/a/b/c", "/a/b", "/a"]


def test_publish_reaches_the_namespace_and_its_ancestors_only():
    hub = Hub()
    exact, parent, sibling, prefix = (FakeStream(n) for n in (
        "/details/2665", "/details", "/details/1F602", "/details/26"))
    for s in (exact, parent, sibling, prefix):
        hub.add(s)  # type: ignore[arg-type]
    frame = b"event:x\ndata:y\n\n"
    assert hub.publish("/details/2665", frame) == 2
    assert exact.frames == [frame] and parent.frames == [frame]
    assert sibling.frames == [] and prefix.frames == []
    # The very same bytes object goes to every stream: encoded (and chunked) once.
    assert exact.frames[0] is parent.frames[0]
    assert exact.chunks[0] is parent.chunks[0] == b"10\r\n" + frame + b"\r\n"
    assert hub.delivered == 2


def test_removed_streams_get_nothing_and_pools_count():
    hub = Hub()
    a, b = FakeStream("/eps", "eps"), FakeStream("/eps", "eps")
    hub.add(a)  # type: ignore[arg-type]
    hub.add(b)  # type: ignore[arg-type]
    assert hub.pool_sizes()["eps"] == 2
    hub.remove(a)  # type: ignore[arg-type]
    hub.remove(a)  # type: ignore[arg-type]
    hub.publish("/eps", b"data:1\n\n")
    assert a.frames == [] and b.frames == [b"data:1\n\n"]
    assert hub.pool_sizes()["eps"] == 1 and len(hub) == 1
    hub.remove(b)  # type: ignore[arg-type]
    assert len(hub) == 0 and list(hub.streams()) == []


def test_a_stream_removed_during_a_broadcast_is_not_written_again():
    hub = Hub()
    victims: list[FakeStream] = []

    class Closing(FakeStream):
        def send(self, frame: bytes, chunked: bytes | None = None) -> None:
            super().send(frame, chunked)
            for v in victims:
                hub.remove(v)  # type: ignore[arg-type]

    first = Closing("/raw", "raw")
    hub.add(first)  # type: ignore[arg-type]
    second = FakeStream("/raw", "raw")
    hub.add(second)  # type: ignore[arg-type]
    victims.append(first)
    hub.publish("/raw", b"data:a\n\n")
    hub.publish("/raw", b"data:b\n\n")
    assert first.frames == [b"data:a\n\n"]
    assert second.frames == [b"data:a\n\n", b"data:b\n\n"]
