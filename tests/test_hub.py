"""The hub's namespace index and its slices per turn, with small recording streams
(pure logic, no I/O, on a Clock)."""

from __future__ import annotations

from twisted.internet.task import Clock

from emojistream.hub import Hub
from emojistream.stream import Stream


class Recording:
    """A small L{Stream}: records what the hub sends it (see L{as_stream}: mypy
    checks it against the protocol)."""

    def __init__(self, namespace: str, kind: str = "detail", created_at: float = 0) -> None:
        self.namespace = namespace
        self.kind = kind
        self.created_at = created_at
        self.client_ip = "192.0.2.1"
        self.request_path = "/subscribe" + namespace
        self.dropped = False
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def send_summary(self, frame: bytes, counts: dict[str, int]) -> None:
        self.frames.append(frame)

    def send_control(self, frame: bytes) -> None:
        self.frames.append(frame)

    def keepalive(self, frame: bytes, tick: int, idle_ticks: int) -> None:
        self.frames.append(frame)

    def tally(self, counts: dict[str, int]) -> None:
        counts["written"] += len(self.frames)

    def close(self, hang_up: bool = False) -> None:
        pass

    def describe_json(self, now: float) -> bytes:
        return b'{"request_path":"%s","age":%d}' % (self.request_path.encode(),
                                                    now - self.created_at)


def as_stream(stream: Recording) -> Stream:
    """A Recording is a Stream (what mypy checks here)."""
    return stream


def test_a_recording_is_a_stream():
    assert as_stream(Recording("/eps")).namespace == "/eps"


def test_publish_reaches_the_namespace_and_its_ancestors_only():
    hub = Hub()
    exact, parent, sibling, prefix = (Recording(n) for n in (
        "/details/2665", "/details", "/details/1F602", "/details/26"))
    for s in (exact, parent, sibling, prefix):
        hub.add(s)
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
    a, b = Recording("/eps", "eps"), Recording("/eps", "eps")
    hub.add(a)
    hub.add(b)
    assert hub.pool_sizes()["eps"] == 2
    hub.remove(a)
    hub.remove(a)
    hub.publish("/eps", b"data:1\n\n")
    assert a.frames == [] and b.frames == [b"data:1\n\n"]
    assert hub.pool_sizes()["eps"] == 1 and len(hub) == 1
    hub.remove(b)
    assert len(hub) == 0 and list(hub.streams()) == []


def test_a_stream_removed_during_a_broadcast_is_not_written_again():
    hub = Hub()
    victims: list[Recording] = []

    class Closing(Recording):
        def send(self, frame: bytes) -> None:
            super().send(frame)
            for v in victims:
                hub.remove(v)

    first = Closing("/raw", "raw")
    hub.add(first)
    second = Recording("/raw", "raw")
    hub.add(second)
    victims.append(first)
    hub.publish("/raw", b"data:a\n\n")
    hub.publish("/raw", b"data:b\n\n")
    assert first.frames == [b"data:a\n\n"]
    assert second.frames == [b"data:a\n\n", b"data:b\n\n"]



def test_a_summary_goes_out_in_slices_one_per_reactor_turn():
    clock = Clock()
    hub = Hub(clock, summary_slice=3)
    done: list[bool] = []
    streams = [Recording("/eps", "eps") for _ in range(7)]
    for s in streams:
        hub.add(s)
    going = hub.publish_summary("/eps", b"data:{}\n\n", {"A": 1})
    assert going is not None
    going.addCallback(lambda _: done.append(True))
    # The first slice goes at once; a detail update arriving meanwhile (a call on the
    # next turn) goes out between two slices, not after all of them.
    assert [len(s.frames) for s in streams] == [1, 1, 1, 0, 0, 0, 0]
    between: list[list[int]] = []
    clock.callLater(0, lambda: between.append([len(s.frames) for s in streams]))
    assert done == []
    clock.advance(0)
    assert between == [[1, 1, 1, 1, 1, 1, 0]]
    assert [len(s.frames) for s in streams] == [1] * 7
    assert done == [True] and clock.getDelayedCalls() == []


def test_the_last_slice_ends_the_summary_in_its_own_turn():
    clock = Clock()
    hub = Hub(clock, summary_slice=3)
    streams = [Recording("/eps", "eps") for _ in range(6)]
    for s in streams:
        hub.add(s)
    done: list[list[int]] = []
    going = hub.publish_summary("/eps", b"data:{}\n\n", {"A": 1})
    assert going is not None
    going.addCallback(lambda _: done.append([len(s.frames) for s in streams]))
    later: list[bool] = []
    clock.callLater(0, lambda: later.append(bool(done)))
    clock.advance(0)
    # Done as the second (last) slice went, before what was queued behind it ran.
    assert done == [[1] * 6] and later == [True]
    # At most a slice's worth of streams: all at once, and no Deferred.
    whole = Hub(clock, summary_slice=6)
    for s in streams:
        whole.add(s)
    assert whole.publish_summary("/eps", b"data:{}\n\n", {"A": 1}) is None
    assert all(len(s.frames) == 2 for s in streams)


def test_a_tick_while_a_summary_goes_out_adds_its_hits_to_the_next():
    from emojistream.summarizer import ScoreSummarizer

    clock = Clock()
    hub = Hub(clock, summary_slice=3)
    streams = [Recording("/eps", "eps") for _ in range(7)]
    for s in streams:
        hub.add(s)
    summarizer = ScoreSummarizer(lambda counts, frame: hub.publish_summary("/eps", frame,
                                                                           counts))
    summarizer.hit("A")
    summarizer.tick()  # goes out over three turns
    summarizer.hit("B")
    summarizer.tick()  # owed: the first is still going out
    summarizer.hit("B")
    assert [len(s.frames) for s in streams] == [1, 1, 1, 0, 0, 0, 0]
    clock.advance(0)  # the first goes out; then the owed tick sends both Bs at once
    assert all(s.frames == [b'data:{"A":1}\n\n', b'data:{"B":2}\n\n'] for s in streams)
    assert clock.getDelayedCalls() == []


def test_without_a_clock_a_summary_goes_out_at_once():
    hub = Hub()
    streams = [Recording("/eps", "eps") for _ in range(1000)]
    for s in streams:
        hub.add(s)
    assert hub.publish_summary("/eps", b"data:{}\n\n", {"A": 1}) is None
    assert all(s.frames == [b"data:{}\n\n"] for s in streams)


def test_the_status_snapshot_is_each_streams_describe_json_parsed_oldest_first():
    hub = Hub()
    young, old = Recording("/raw", "raw", created_at=5), Recording("/eps", "eps", created_at=1)
    hub.add(young)
    hub.add(old)
    assert hub.snapshot(10) == [{"request_path": "/subscribe/eps", "age": 9},
                                {"request_path": "/subscribe/raw", "age": 5}]
