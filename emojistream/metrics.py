"""Prometheus metrics: what C{/metrics} serves, read from the daemon's own counters at
scrape time (nothing is counted twice, and the hot path pays nothing for it).

Names follow Prometheus conventions: an C{emojistream_} prefix, C{_total} on
counters, seconds and bytes as base units. The library's process, platform and GC
collectors come along, in a registry of this daemon's own (no global state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from emojistream.delays import Delays, DeliveryDelays
from emojistream.replay import Journal

__all__ = ["CONTENT_TYPE", "MetricSources", "Metrics"]

#: The Content-Type of the text exposition format.
CONTENT_TYPE = CONTENT_TYPE_LATEST.encode("ascii")

@dataclass
class MetricSources:
    """Where each figure comes from: callables read at scrape time."""

    pools: Callable[[], Mapping[str, int]]
    counters: Callable[[], Mapping[str, float]]
    redis_state: Callable[[], str]
    tick_lags: Delays
    delays: DeliveryDelays
    #: With --event-ids, the journal (replay hits, misses, buffer sizes).
    replay: Journal | None = None
    #: Where events come from: pubsub or streams.
    source: str = "pubsub"
    #: With --source streams, the stream's figures (L{emojistream.streamfeed.StreamWatch}).
    stream: Callable[[], Mapping[str, Any]] | None = None
    #: With --source streams, what resumes read from Redis (running, waiting, busy, pages).
    replay_fetches: Callable[[], Mapping[str, int]] | None = None


#: Counter name, help, and the key of the daemon's counters it reads.
_COUNTERS = (
    ("messages_received", "Messages received from Redis", "messages.received"),
    ("messages_dropped", "Messages from Redis dropped: a channel or ID that makes no "
     "sense, or a payload over --max-payload-bytes", "messages.dropped"),
    ("messages_oversized", "Of the dropped, those over --max-payload-bytes",
     "messages.oversized"),
    ("messages_delivered", "Messages written to clients (one per message per client)",
     "messages.delivered"),
    ("messages_conflated", "Score summaries merged into another for a backed-up client",
     "messages.conflated"),
    ("messages_discarded", "Messages never written: held when their connection ended",
     "messages.discarded"),
    ("connections_closed", "Streams ended, for whatever reason", "connections.closed"),
    ("connections_dropped", "Streams dropped for not keeping up", "connections.dropped"),
    ("redis_reconnects", "Times the Redis subscriber was lost and replaced",
     "redis.subscriber_losses"),
    ("accept_pauses", "Times accepting paused at the open-file limit",
     "connections.accept_pauses"),
    ("admin_status_refused", "Whole status documents refused (429) to an address asking "
     "more than twice a second", "admin.status_refused"),
)
#: The states of the Redis subscriber connection (emojistream.connection).
REDIS_STATES = ("connecting", "up", "down", "stopped")
_REFUSED = (("per_ip", "connections.refused_per_ip"), ("at_limit", "connections.refused_at_limit"))


class _DaemonCollector(Collector):
    def __init__(self, sources: MetricSources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self._sources
        streams = GaugeMetricFamily("emojistream_streams", "Open streams, by pool",
                                    labels=["pool"])
        for pool, n in s.pools().items():
            streams.add_metric([pool], n)
        yield streams
        counters = s.counters()
        for name, text, key in _COUNTERS:
            yield CounterMetricFamily(f"emojistream_{name}", text, value=counters.get(key, 0))
        refused = CounterMetricFamily("emojistream_connections_refused",
                                      "TCP connections closed at once, by why",
                                      labels=["reason"])
        for reason, key in _REFUSED:
            refused.add_metric([reason], counters.get(key, 0))
        yield refused
        state = s.redis_state()
        yield GaugeMetricFamily("emojistream_redis_subscribed",
                                "1 while subscribed to Redis, else 0",
                                value=1 if state == "up" else 0)
        states = GaugeMetricFamily("emojistream_redis_state",
                                   "The Redis subscriber's state: 1 for the current one",
                                   labels=["state"])
        for name in REDIS_STATES:
            states.add_metric([name], 1 if state == name else 0)
        yield states
        sources = GaugeMetricFamily("emojistream_source",
                                    "Where events come from: 1 for the source in use",
                                    labels=["source"])
        for name in ("pubsub", "streams"):
            sources.add_metric([name], 1 if s.source == name else 0)
        yield sources
        if s.stream is not None:
            yield from _stream_metrics(s.stream())
        yield _histogram("emojistream_score_tick_lag_seconds",
                         "How late each score tick (60 a second) ran", s.tick_lags)
        delays = HistogramMetricFamily(
            "emojistream_delivery_delay_seconds",
            "Detail updates, to their write to clients: since their publication when the "
            "payload carries published_at, else since the Redis read that brought them",
            labels=["since"])
        for since, histogram in (("publish", s.delays.since_publish),
                                 ("read", s.delays.since_read)):
            delays.add_metric([since], histogram.cumulative(), histogram.sum)
        yield delays
        journal = s.replay
        if journal is not None:
            yield CounterMetricFamily("emojistream_replay_hits",
                                      "Resumes filled from the replay buffers",
                                      value=journal.hits)
            misses = CounterMetricFamily("emojistream_replay_misses",
                                         "Resumes that could not be filled, by why",
                                         labels=["reason"])
            for reason, n in journal.misses.items():
                misses.add_metric([reason], n)
            yield misses
            if journal.positions:
                yield CounterMetricFamily("emojistream_replay_fetched",
                                          "Resumes filled from the stream in Redis (the "
                                          "replay buffers did not hold them)",
                                          value=journal.fetched)
            if s.replay_fetches is not None:
                fetches = s.replay_fetches()
                yield GaugeMetricFamily("emojistream_replay_fetches_running",
                                        "Resumes reading the stream in Redis now",
                                        value=fetches["fetching"])
                yield GaugeMetricFamily("emojistream_replay_fetches_waiting",
                                        "Resumes waiting their turn to read the stream",
                                        value=fetches["fetch_waiting"])
                yield CounterMetricFamily("emojistream_replay_fetches_refused",
                                          "Resumes not queued: too many waited already",
                                          value=fetches["fetch_busy"])
                yield CounterMetricFamily("emojistream_replay_fetch_pages",
                                          "XRANGE pages read from the stream for resumes",
                                          value=fetches["fetch_pages"])
            yield GaugeMetricFamily("emojistream_replay_buffer_bytes",
                                    "Memory the replay buffers hold (estimated)",
                                    value=journal.size)
            yield GaugeMetricFamily("emojistream_replay_buffer_events",
                                    "Events the replay buffers hold", value=journal.events)


def _stream_metrics(figures: Mapping[str, Any]) -> Iterator[Metric]:
    """The stream source's figures (L{emojistream.streamfeed.StreamWatch.figures})."""
    if figures["length"] is not None:
        yield GaugeMetricFamily("emojistream_stream_length", "Entries the stream holds",
                                value=figures["length"])
    if figures["lag"] is not None:
        yield GaugeMetricFamily("emojistream_stream_lag_entries",
                                "Entries of the stream after the newest this node read "
                                "(counted up to 1000)", value=figures["lag"])
    yield CounterMetricFamily("emojistream_stream_entries_read",
                              "Stream entries read and handed on", value=figures["entries_read"])
    yield CounterMetricFamily("emojistream_stream_reads", "XREAD replies",
                              value=figures["reads"])
    yield CounterMetricFamily("emojistream_stream_entries_skipped",
                              "Stream entries that are not emojistream's (skipped)",
                              value=figures["skipped"])
    gaps = CounterMetricFamily("emojistream_stream_gaps",
                               "Times the reader could not go on where it left off, by "
                               "why: the stream replaced, or entries trimmed unread",
                               labels=["reason"])
    for reason, n in figures["gaps"].items():
        gaps.add_metric([reason], n)
    yield gaps
    bridge = figures["bridge"]
    yield GaugeMetricFamily("emojistream_stream_bridge_active",
                            "1 while a bridge holds the lease on the stream, else 0",
                            value=1 if bridge is not None else 0)
    if bridge is not None and bridge["ttl_ms"] is not None:
        yield GaugeMetricFamily("emojistream_stream_bridge_lease_seconds",
                                "What is left of the bridge's lease",
                                value=max(0, bridge["ttl_ms"]) / 1000)


def _histogram(name: str, text: str, delays: Delays) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, text, buckets=delays.cumulative(),
                                 sum_value=delays.sum)


class _Labelled(Collector):
    """Another collector's metrics with constant labels added to every sample."""

    def __init__(self, inner: Collector, labels: Mapping[str, str]) -> None:
        self._inner = inner
        self._labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        for metric in self._inner.collect():
            metric.samples = [s._replace(labels={**s.labels, **self._labels})
                              for s in metric.samples]
            yield metric


class Metrics:
    """This daemon's registry: its own figures and the process's.

    @param labels: added to every sample: a C{--workers} worker's C{worker} number, so
        that scrapes of the shared port that reach different workers are different
        series, never one counter going back and forth.
    """

    def __init__(self, sources: MetricSources, labels: Mapping[str, str] | None = None
                 ) -> None:
        own = CollectorRegistry(auto_describe=False)
        own.register(_DaemonCollector(sources))
        ProcessCollector(registry=own)
        PlatformCollector(registry=own)
        GCCollector(registry=own)
        self.registry = own
        if labels:
            self.registry = CollectorRegistry(auto_describe=False)
            self.registry.register(_Labelled(own, labels))

    def exposition(self) -> bytes:
        """The text exposition format, as C{/metrics} serves it."""
        return generate_latest(self.registry)
