"""/metrics: Prometheus text that the prometheus-client parser reads, whose counters
move with traffic; behind the admin token when one is set."""

from __future__ import annotations

import time

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from conftest import running
from emojistream.delays import Delays
from memory import MemoryDaemon
from redisproc import RedisProcess
from sseclient import within


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode("utf-8"))
            for s in family.samples}


def scrape(d: MemoryDaemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The daemon's /metrics, parsed (after checking its content type)."""
    client = d.connect()
    client.get("/metrics")
    assert client.head[1]["content-type"].startswith("text/plain; version=")
    return samples(client.body)


def test_metrics_parse_and_move_with_traffic_in_memory():
    d = MemoryDaemon({"SSE_EVENT_IDS": "1"})
    d.connect().get("/subscribe/details/2665")
    d.connect().get("/subscribe/details/2665")
    d.connect().get("/subscribe/raw", headers="Last-Event-ID: 00000000-1\r\n")
    first = scrape(d)
    d.publish(b"stream.tweet_updates.2665", b"{}")
    d.publish(b"stream.tweet_updates.nope!", b"{}")
    second = scrape(d)
    assert second[("emojistream_streams", (("pool", "detail"),))] == 2
    assert second[("emojistream_messages_received_total", ())] - \
        first[("emojistream_messages_received_total", ())] == 2
    assert second[("emojistream_messages_dropped_total", ())] == 1
    assert second[("emojistream_messages_delivered_total", ())] - \
        first[("emojistream_messages_delivered_total", ())] == 2
    assert second[("emojistream_delivery_delay_seconds_count", (("since", "read"),))] == 1
    assert ("emojistream_score_tick_lag_seconds_count", ()) in second
    assert second[("emojistream_replay_misses_total", (("reason", "foreign"),))] == 1
    assert second[("emojistream_replay_buffer_events", ())] == 1
    assert second[("emojistream_redis_subscribed", ())] == 0
    assert second[("emojistream_redis_state", (("state", "connecting"),))] == 1
    assert second[("emojistream_redis_state", (("state", "up"),))] == 0
    assert ("process_resident_memory_bytes", ()) in second


def test_metrics_want_the_admin_token_when_one_is_set():
    d = MemoryDaemon({"ADMIN_TOKEN": "s3cret-token-0123456789"})
    anonymous, wrong, right = d.connect(), d.connect(), d.connect()
    anonymous.get("/metrics")
    wrong.get("/metrics", headers="Authorization: Bearer nope\r\n")
    right.get("/metrics", headers="Authorization: Bearer s3cret-token-0123456789\r\n")
    assert anonymous.head[0] == wrong.head[0] == "HTTP/1.1 401 Unauthorized"
    assert right.head[0] == "HTTP/1.1 200 OK"
    assert ("emojistream_messages_received_total", ()) in samples(right.body)


def test_a_payload_that_says_when_it_was_published_is_timed_from_then():
    from emojistream.router import published_at

    assert published_at(b'{"id":"1","published_at":1700000000.25,"text":"x"}') == 1700000000.25
    assert published_at(b'{"published_at": 1700000000}') == 1700000000.0
    for no in (b'{"created_at":"2020-06-16T10:00:00Z"}', b'{"published_at":"soon"}',
               b'{"published_at":12}'):
        assert published_at(no) is None
    d = MemoryDaemon()
    d.connect().get("/subscribe/details/2665")
    d.reactor.advance(1_700_000_010)
    d.publish(b"stream.tweet_updates.2665", b'{"published_at":1700000000.5}')
    d.publish(b"stream.tweet_updates.2665", b'{"n":2}')
    got = scrape(d)
    assert got[("emojistream_delivery_delay_seconds_count", (("since", "publish"),))] == 1
    assert got[("emojistream_delivery_delay_seconds_sum", (("since", "publish"),))] == 9.5
    assert got[("emojistream_delivery_delay_seconds_count", (("since", "read"),))] == 1


def test_the_ticker_tells_how_late_each_tick_ran():
    from twisted.internet.task import Clock

    from emojistream.summarizer import Ticker

    clock, lags = Clock(), Delays((0.01, 0.1))
    ticker = Ticker(0.1, lambda: None, clock, lateness=lags.observe)
    ticker.startService()
    clock.advance(0.1)   # on time
    clock.advance(0.15)  # 0.05 late
    ticker.stopService()
    assert lags.cumulative() == [("0.01", 1), ("0.1", 2), ("+Inf", 2)]
    assert abs(lags.sum - 0.05) < 1e-9


def test_the_delay_histogram_buckets_weighted_observations():
    delays = Delays((0.001, 0.01))
    delays.observe(0.0005, 3)
    delays.observe(0.005)
    delays.observe(2.0)
    assert delays.cumulative() == [("0.001", 3), ("0.01", 4), ("+Inf", 5)]
    assert abs(delays.sum - 2.0065) < 1e-9


@pytest_twisted.ensureDeferred
async def test_metrics_over_http_count_what_redis_published(redis_server: RedisProcess,
                                                            publisher: object) -> None:
    env = {"REDIS_URL": redis_server.url, "NODE_NAME": "m"}
    async with running(env) as (_daemon, client):
        _, reader = await client.stream("/subscribe/details/2665")
        _, before = await client.text("GET", "/metrics")
        for n in range(5):
            await within(publisher.publish("stream.tweet_updates.2665",  # type: ignore[attr-defined]
                                           b'{"n":%d}' % n))
        # A feeder that says when it published: timed from then.
        await within(publisher.publish(  # type: ignore[attr-defined]
            "stream.tweet_updates.2665", b'{"n":5,"published_at":%.6f}' % time.time()))
        await reader.wait_events(6)
        _, after = await client.text("GET", "/metrics")
        first, second = samples(before), samples(after)
        received = ("emojistream_messages_received_total", ())
        delivered = ("emojistream_messages_delivered_total", ())
        assert second[received] - first[received] == 6
        assert second[delivered] - first[delivered] == 6
        assert second[("emojistream_redis_subscribed", ())] == 1
        assert second[("emojistream_redis_state", (("state", "up"),))] == 1
        assert second[("emojistream_delivery_delay_seconds_count", (("since", "read"),))] == 5
        since_publish = (("since", "publish"),)
        assert second[("emojistream_delivery_delay_seconds_count", since_publish)] == 1
        assert 0 <= second[("emojistream_delivery_delay_seconds_sum", since_publish)] < 1
