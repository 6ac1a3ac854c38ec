"""Micro-benchmark of the broadcast path alone: hub → streams → an in-memory transport,
no sockets, no Redis, no reactor. Steady enough to compare changes to that path.

    python benchmarks/broadcast.py [--streams 1000] [--messages 2000] [--repeats 7]

Prints, for a detail broadcast to every stream, a score summary to every /eps stream,
and a Redis read's worth of messages coalesced per stream: the median nanoseconds per
delivered message over the repeats (and the spread).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

import emojistream
from emojistream.batching import Batcher
from emojistream.hub import Hub
from emojistream.sse import encode_event
from emojistream.summarizer import summary_frame

# Since the subscription owns a stream's life, one class for every kind; an older
# commit (measured against this one, from its own tree) has Stream and SummaryStream.
if (Path(emojistream.__file__).parent / "subscription.py").exists():
    from emojistream.subscription import Subscription
else:
    Subscription = None  # type: ignore[assignment,misc]


class NullTransport:
    """Takes every write, keeps only the count of bytes."""

    disconnecting = False

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)


class MemoryRequest:
    """What a stream uses of a request on an HTTP/1.1 channel, over NullTransport."""

    chunked = True

    def __init__(self) -> None:
        self.channel = HTTPChannel()
        self.channel.transport = NullTransport()  # type: ignore[assignment]
        self.transport = self.channel.transport
        self.producer: Any = None
        self.responseHeaders = Headers()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        pass

    def getHeader(self, name: bytes) -> bytes | None:
        return None

    def notifyFinish(self) -> Deferred[None]:
        return Deferred()


def streams(hub: Hub, n: int, kind: str, namespace: str, batcher: Batcher | None
            ) -> list[Any]:
    made: list[Any] = []
    if Subscription is not None:
        from emojistream.writers import ChunkFramer, writer_for

        framer = ChunkFramer()
        for _ in range(n):
            writer = writer_for(kind, MemoryRequest(),  # type: ignore[arg-type]
                                max_queue=1 << 20, batcher=batcher, framer=framer)
            subscription = Subscription(writer, hub=hub, clock=Clock(), namespace=namespace,
                                        kind=kind, client_ip="x")
            subscription.start()
            made.append(subscription)
        return made
    from emojistream.stream import Stream, SummaryStream  # type: ignore[attr-defined]

    # As the web routes make them: one framer shared by a site's streams, where the
    # code has one (it chunks a broadcast's frame once for all of them).
    shared: dict[str, Any] = {}
    if "framer" in inspect.signature(Stream.__init__).parameters:
        from emojistream.writers import ChunkFramer, writer_for

        shared["framer"] = ChunkFramer()
    for i in range(n):
        cls = SummaryStream if kind == "eps" else Stream
        stream = cls(MemoryRequest(), namespace=namespace, kind=kind,  # type: ignore[arg-type]
                     request_path="/subscribe" + namespace, created_at=i, client_ip="x",
                     user_agent="", batcher=batcher, **shared)
        stream.start()
        hub.add(stream)
        made.append(stream)
    return made


def measure(work: Callable[[], int], repeats: int) -> tuple[float, float, float]:
    """Median, min and max nanoseconds per delivery of C{work} (returns deliveries)."""
    results = []
    for _ in range(repeats):
        gc.collect()
        started = time.perf_counter_ns()
        deliveries = work()
        results.append((time.perf_counter_ns() - started) / deliveries)
    return statistics.median(results), min(results), max(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    batcher = Batcher()
    hub = Hub()
    streams(hub, args.streams, "detail", "/details/2665", batcher)
    streams(hub, args.streams, "eps", "/eps", batcher)
    frames = [encode_event(b'{"id":"%d","text":"a tweet of some length"}' % i,
                           b"stream.tweet_updates.2665") for i in range(args.messages)]
    counts = {"2665": 3, "1F602": 1}
    summary = summary_frame(counts)

    def details() -> int:
        for frame in frames:
            hub.publish("/details/2665", frame)
        return len(frames) * args.streams

    def summaries() -> int:
        for _ in range(args.messages):
            hub.publish_summary("/eps", summary, counts)
        return args.messages * args.streams

    def coalesced() -> int:
        # One Redis read bringing 20 detail updates: two sends per stream.
        for start in range(0, len(frames), 20):
            batcher.begin_round()
            for frame in frames[start:start + 20]:
                hub.publish("/details/2665", frame)
            batcher.end_round()
        return len(frames) * args.streams

    print(f"{args.streams} streams, {args.messages} messages, median of {args.repeats} "
          "(min-max), ns per delivered message")
    for name, work in (("detail broadcast", details), ("score summary", summaries),
                       ("20 per Redis read", coalesced)):
        median, low, high = measure(work, args.repeats)
        print(f"  {name:<18} {median:8.1f}  ({low:.1f}-{high:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
