"""The hub's namespace index, with stand-in streams (pure logic, no I/O)."""

from __future__ import annotations

from emojistream.hub import Hub


class FakeStream:
    def __init__(self, namespace: str, kind: str = "detail", created_at: float = 0) -> None:
        self.namespace = namespace
        self.kind = kind
        self.created_at = created_at
        self.client_ip = "192.0.2.1"
        self.dropped = False
        self.frames: list[bytes] = []
        self.msgs_sent = 0
        self.discarded = 0

    @property
    def written(self) -> int:
        return len(self.frames)

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def send_control(self, frame: bytes) -> None:
        self.frames.append(frame)

    def keepalive(self, frame: bytes, tick: int, idle_ticks: int) -> None:
        self.frames.append(frame)


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
    # The very same bytes object goes to every stream: encoded once, and SSE only (the
    # HTTP framing is each writer's).
    assert exact.frames[0] is parent.frames[0] is frame
    assert hub.message_counts() == {"written": 2, "conflated": 0, "discarded": 0}


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
        def send(self, frame: bytes) -> None:
            super().send(frame)
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


class FakeSummaryStream(FakeStream):
    def send_summary(self, frame: bytes, counts: dict[str, int]) -> None:
        self.frames.append(frame)


class Turns:
    """A reactor's callLater(0), one turn at a time."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def callLater(self, delay: float, f, *args) -> None:
        assert delay == 0
        self.calls.append((f, args))

    def turn(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


def test_a_summary_goes_out_in_slices_one_per_reactor_turn():
    reactor = Turns()
    hub = Hub(reactor, summary_slice=3)  # type: ignore[arg-type]
    done: list[bool] = []
    streams = [FakeSummaryStream("/eps", "eps") for _ in range(7)]
    for s in streams:
        hub.add(s)  # type: ignore[arg-type]
    going = hub.publish_summary("/eps", b"data:{}\n\n", {"A": 1})
    assert going is not None
    going.addCallback(lambda _: done.append(True))
    assert [len(s.frames) for s in streams] == [1, 1, 1, 0, 0, 0, 0]
    reactor.turn()
    assert [len(s.frames) for s in streams] == [1, 1, 1, 1, 1, 1, 0]
    assert done == []
    reactor.turn()
    assert [len(s.frames) for s in streams] == [1] * 7
    assert reactor.calls == [] and done == [True]


def test_a_tick_while_a_summary_goes_out_adds_its_hits_to_the_next():
    from emojistream.summarizer import ScoreSummarizer

    reactor = Turns()
    hub = Hub(reactor, summary_slice=3)  # type: ignore[arg-type]
    streams = [FakeSummaryStream("/eps", "eps") for _ in range(7)]
    for s in streams:
        hub.add(s)  # type: ignore[arg-type]
    summarizer = ScoreSummarizer(lambda counts, frame: hub.publish_summary("/eps", frame,
                                                                           counts))
    summarizer.hit("A")
    summarizer.tick()  # goes out over three turns
    summarizer.hit("B")
    summarizer.tick()  # owed: the first is still going out
    summarizer.hit("B")
    assert [len(s.frames) for s in streams] == [1, 1, 1, 0, 0, 0, 0]
    reactor.turn()
    reactor.turn()  # the first is out; the owed tick sends both Bs at once
    assert streams[0].frames == [b'data:{"A":1}\n\n', b'data:{"B":2}\n\n']
    reactor.turn()
    reactor.turn()
    assert all(len(s.frames) == 2 for s in streams) and reactor.calls == []


def test_without_a_reactor_a_summary_goes_out_at_once():
    hub = Hub()
    streams = [FakeSummaryStream("/eps", "eps") for _ in range(1000)]
    for s in streams:
        hub.add(s)  # type: ignore[arg-type]
    assert hub.publish_summary("/eps", b"data:{}\n\n", {"A": 1}) is None
    assert all(s.frames == [b"data:{}\n\n"] for s in streams)
