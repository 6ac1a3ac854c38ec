"""Micro-benchmark of the broadcast path alone: hub → streams → an in-memory transport,
no sockets, no Redis, no reactor. Steady enough to compare changes to that path.

    python benchmarks/broadcast.py [--streams 1000] [--messages 2000] [--repeats 7]

    python benchmarks/broadcast.py --against /tmp/old   # A/B in one process

Prints, for a detail broadcast to every stream, a score summary to every /eps stream,
a Redis read's worth of messages coalesced per stream, detail updates each to a
namespace of its own with one stream (the hub's cost per message, not shared by a
pool), and, where the code has the adaptive write policy, streams that coalesce a
tick's messages: the median nanoseconds per delivered message over the repeats (and
the spread).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

HERE = Path(__file__).resolve().parent.parent


def load(checkout: Path) -> SimpleNamespace:
    """The modules of C{checkout}'s emojistream this benchmark uses, imported afresh
    (any emojistream imported before is forgotten; objects made from it keep working),
    so that two checkouts can be measured in one process."""
    for name in [n for n in sys.modules if n == "emojistream" or n.startswith("emojistream.")]:
        del sys.modules[name]
    sys.path.insert(0, str(checkout))
    try:
        package = importlib.import_module("emojistream")
        code = SimpleNamespace(
            Batcher=importlib.import_module("emojistream.batching").Batcher,
            Hub=importlib.import_module("emojistream.hub").Hub,
            encode_event=importlib.import_module("emojistream.sse").encode_event,
            summary_frame=importlib.import_module("emojistream.summarizer").summary_frame,
            stream_module=importlib.import_module("emojistream.stream"),
            writers=None, Subscription=None)
        if (Path(package.__file__).parent / "writers.py").exists():
            code.writers = importlib.import_module("emojistream.writers")
        # Since the subscription owns a stream's life, one class for every kind; an
        # older commit has Stream and SummaryStream.
        if (Path(package.__file__).parent / "subscription.py").exists():
            code.Subscription = importlib.import_module("emojistream.subscription").Subscription
    finally:
        sys.path.remove(str(checkout))
    return code


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


def streams(code: SimpleNamespace, hub: Any, n: int, kind: str, namespace: str,
            batcher: Any) -> list[Any]:
    made: list[Any] = []
    if code.Subscription is not None:
        framer = code.writers.ChunkFramer()
        for _ in range(n):
            writer = code.writers.writer_for(kind, MemoryRequest(), max_queue=1 << 20,
                                             batcher=batcher, framer=framer)
            subscription = code.Subscription(writer, hub=hub, clock=Clock(),
                                             namespace=namespace, kind=kind, client_ip="x")
            subscription.start()
            made.append(subscription)
        return made
    Stream, SummaryStream = code.stream_module.Stream, code.stream_module.SummaryStream

    # As the web routes make them: one framer shared by a site's streams, where the
    # code has one (it chunks a broadcast's frame once for all of them).
    shared: dict[str, Any] = {}
    if "framer" in inspect.signature(Stream.__init__).parameters:
        shared["framer"] = code.writers.ChunkFramer()
    for i in range(n):
        cls = SummaryStream if kind == "eps" else Stream
        stream = cls(MemoryRequest(), namespace=namespace, kind=kind,
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


def cases(code: SimpleNamespace, args: argparse.Namespace) -> list[tuple[str, Callable[[], int]]]:
    """The measured broadcasts, on streams made with C{code}."""
    batcher = code.Batcher()
    hub = code.Hub()
    streams(code, hub, args.streams, "detail", "/details/2665", batcher)
    streams(code, hub, args.streams, "eps", "/eps", batcher)
    singles = [f"/details/S{i}" for i in range(args.streams)]
    for namespace in singles:
        streams(code, hub, 1, "detail", namespace, batcher)
    coalescing = streams(code, hub, args.streams, "raw", "/raw", batcher)
    for subscription in coalescing:
        if not hasattr(subscription, "coalesce"):
            coalescing = []
            break
        subscription.coalesce(True)
    frames = [code.encode_event(b'{"id":"%d","text":"a tweet of some length"}' % i,
                                b"stream.tweet_updates.2665") for i in range(args.messages)]
    counts = {"2665": 3, "1F602": 1}
    summary = code.summary_frame(counts)

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

    def one_each() -> int:
        for i, frame in enumerate(frames):
            hub.publish(singles[i % len(singles)], frame)
        return len(frames)

    def per_tick() -> int:
        # /raw at 400/s: about 7 messages a tick, one write per stream at the tick.
        for start in range(0, len(frames), 7):
            for frame in frames[start:start + 7]:
                hub.publish("/raw", frame)
            batcher.flush()
        return len(frames) * args.streams

    made: list[tuple[str, Callable[[], int]]] = [
        ("detail broadcast", details), ("score summary", summaries),
        ("20 per Redis read", coalesced), ("one stream per ID", one_each)]
    if coalescing:
        made.append(("7 per tick, held", per_tick))
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--against", metavar="DIR", type=Path,
                        help="also measure another checkout's code (e.g. a git worktree "
                             "of an older commit) in this process, each case's runs of "
                             "the two alternating, and print the ratio this/other")
    args = parser.parse_args(argv)

    mine = cases(load(HERE), args)
    if args.against is None:
        print(f"{args.streams} streams, {args.messages} messages, median of {args.repeats} "
              "(min-max), ns per delivered message")
        for name, work in mine:
            median, low, high = measure(work, args.repeats)
            print(f"  {name:<18} {median:8.1f}  ({low:.1f}-{high:.1f})")
        return 0
    other = dict(cases(load(args.against.resolve()), args))
    print(f"{args.streams} streams, {args.messages} messages, {args.repeats} alternating "
          f"runs each, ns per delivered message: median (min) of {args.against} / of "
          "this checkout, and this/other")
    for name, work in mine:
        if name not in other:
            median, low, _ = measure(work, args.repeats)
            print(f"  {name:<18} {'-':>17} / {median:7.1f} ({low:.1f})")
            continue
        theirs: list[float] = []
        ours: list[float] = []
        for _ in range(args.repeats):
            theirs.append(measure(other[name], 1)[0])
            ours.append(measure(work, 1)[0])
        a, b = statistics.median(theirs), statistics.median(ours)
        print(f"  {name:<18} {a:7.1f} ({min(theirs):.1f}) / {b:7.1f} ({min(ours):.1f})"
              f"  {b / a:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
