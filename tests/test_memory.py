"""The fast tier: routes, streams, limits, forced refresh and drain, driven in memory
(tests/memory.py) with a MemoryReactorClock; no Redis, no sockets, no processes."""

from __future__ import annotations

import json

from memory import MemoryDaemon

SSE = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "access-control-allow-origin": "*",
    "x-accel-buffering": "no",
}


def test_streams_answer_with_the_sse_headers_and_deliver_by_namespace():
    d = MemoryDaemon()
    one, parent, other = d.connect(), d.connect(), d.connect()
    one.get("/subscribe/details/2665")
    parent.get("/subscribe/details")
    other.get("/subscribe/details/26")
    for client in (one, parent, other):
        status, headers = client.head
        assert status == "HTTP/1.1 200 OK"
        assert {k: headers[k] for k in SSE} == SSE
    d.publish(b"stream.tweet_updates.2665", b'{"a":1}\nsecond line')
    expected = [("stream.tweet_updates.2665", '{"a":1}\nsecond line')]
    assert [(e.type, e.data) for e in one.events()] == expected
    assert [(e.type, e.data) for e in parent.events()] == expected
    assert other.events() == []


def test_raw_and_eps_streams():
    d = MemoryDaemon()
    raw, eps = d.connect(), d.connect()
    raw.get("/subscribe/raw")
    eps.get("/subscribe/eps")
    for emoji_id in (b"2665", b"1F602", b"2665"):
        d.publish(b"stream.score_updates", emoji_id)
    d.app.summarizer.tick()
    d.flush()
    assert [e.data for e in raw.events()] == ["2665", "1F602", "2665"]
    assert [json.loads(e.data) for e in eps.events()] == [{"2665": 2, "1F602": 1}]
    d.app.summarizer.tick()  # no hits since: nothing, never {}
    d.flush()
    assert len(eps.events()) == 1


def test_head_ends_at_once_and_bad_requests_get_short_text():
    d = MemoryDaemon()
    head = d.connect()
    head.get("/subscribe/eps", method="HEAD")
    assert head.head[0] == "HTTP/1.1 200 OK" and len(d.app.hub) == 0
    for path, code in (("/subscribe/details/a.b", 400), ("/nope", 404),
                       ("/subscribe/details/2665%0d%0a", 400)):
        client = d.connect()
        client.get(path)
        assert client.head[0].startswith(f"HTTP/1.1 {code} ")
        assert bytes(client.received).endswith(b"\n")


def test_stream_limits_refuse_before_any_state():
    d = MemoryDaemon({"MAX_STREAMS": "2", "MAX_STREAMS_PER_IP": "1"})
    first, second = d.connect("10.0.0.1"), d.connect("10.0.0.1")
    first.get("/subscribe/eps")
    second.get("/subscribe/eps")
    assert second.head[0] == "HTTP/1.1 429 Too Many Requests"
    assert second.head[1]["retry-after"] == "10" and second.closed
    d.connect("10.0.0.2").get("/subscribe/raw")
    third = d.connect("10.0.0.3")
    third.get("/subscribe/raw")
    assert third.head[0] == "HTTP/1.1 503 Service Unavailable" and third.closed
    assert len(d.app.hub) == 2


def test_connections_per_address_are_closed_before_anything_is_read():
    d = MemoryDaemon({"MAX_CONNECTIONS_PER_IP": "2"})
    kept = [d.connect("10.0.0.1") for _ in range(2)]
    refused = d.connect("10.0.0.1")
    assert refused.closed and not any(c.closed for c in kept)
    assert d.app.gate.refused_per_ip == 1
    other = d.connect("10.0.0.2")
    other.get("/subscribe/eps")
    assert other.head[0] == "HTTP/1.1 200 OK"


def test_a_request_head_has_a_deadline_and_a_stream_does_not():
    d = MemoryDaemon({"REQUEST_TIMEOUT_SEC": "3"})
    slow, stream = d.connect(), d.connect()
    stream.get("/subscribe/details/2665")
    slow.send(b"GET /subscribe/eps HTTP/1.1\r\n")
    for n in range(2):
        d.advance(1.4)
        slow.send(b"X-Trickle-%d: 1\r\n" % n)
    assert not slow.closed
    d.advance(0.3)
    assert slow.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and slow.closed
    d.advance(60)
    assert not stream.closed
    d.publish(b"stream.tweet_updates.2665", b"still here")
    assert [e.data for e in stream.events()] == ["still here"]


def test_forced_refresh_hints_marks_and_closes_at_the_maximum_age():
    d = MemoryDaemon({"SSE_FORCE_REFRESH": "1", "SSE_SCORE_FORCECLOSE_SEC": "30",
                      "SSE_DETAIL_FORCECLOSE_SEC": "60"})
    score, detail = d.connect(), d.connect()
    score.get("/subscribe/eps")
    detail.get("/subscribe/details/2665")
    assert score.head[1]["x-sse-cleanup-requested"] == "true"
    from sseclient import response_events

    assert response_events(bytes(score.received)).retries == [100]
    assert response_events(bytes(detail.received)).retries == [500]
    d.advance(30)
    assert bytes(score.received).endswith(b"0\r\n\r\n")  # the response ended
    assert not bytes(detail.received).endswith(b"0\r\n\r\n")
    d.advance(30)
    assert bytes(detail.received).endswith(b"0\r\n\r\n")
    assert len(d.app.hub) == 0


def test_cleanup_closes_the_callers_streams_only():
    d = MemoryDaemon()
    mine, theirs = d.connect("10.0.0.1"), d.connect("10.0.0.2")
    mine.get("/subscribe/eps")
    theirs.get("/subscribe/eps")
    caller = d.connect("10.0.0.1")
    caller.get("/subscribe/cleanup/scores", method="POST")
    _, _, body = bytes(caller.received).partition(b"\r\n\r\n")
    assert b'{"status":"OK","closed":1}' in body
    assert len(d.app.hub.in_namespace("/eps")) == 1


def test_keepalives_go_to_streams_idle_for_the_interval():
    d = MemoryDaemon({"SSE_KEEPALIVE_SEC": "15"})
    idle, busy = d.connect(), d.connect()
    idle.get("/subscribe/details/A")
    busy.get("/subscribe/details/B")
    for tick in range(1, 11):  # 30 s of keepalive ticks, 3 s apart
        if tick % 2:
            d.publish(b"stream.tweet_updates.B", b"x")
        d.app.hub.keepalive(b":\n\n")
        d.flush()
    from sseclient import response_events

    assert len(response_events(bytes(idle.received)).comments) == 2
    assert response_events(bytes(busy.received)).comments == []


def test_the_drain_hints_and_closes_every_stream_within_its_period():
    d = MemoryDaemon({"SSE_DRAIN_SEC": "10"})
    clients = [d.connect() for _ in range(20)]
    for client in clients:
        client.get("/subscribe/raw")
    done = d.app.drain.stopService()
    d.flush()
    from sseclient import response_events

    for client in clients:
        (retry,) = response_events(bytes(client.received)).retries
        assert 1000 <= retry <= 4000
    fired: list[bool] = []
    done.addCallback(lambda _: fired.append(True))
    d.advance(9)
    assert fired == [True] and all(c.closed for c in clients) and len(d.app.hub) == 0
    # A stream asked for now, on a new request, is told to come back.
    late = d.connect()
    late.get("/subscribe/eps")
    assert response_events(bytes(late.received)).retries and late.closed


def test_health_live_always_and_ready_only_when_subscribed():
    d = MemoryDaemon()
    live, ready = d.connect(), d.connect()
    live.get("/health/live")
    ready.get("/health/ready")  # never started: not subscribed to Redis
    assert live.head[0] == "HTTP/1.1 200 OK"
    assert live.head[1]["access-control-allow-origin"] == "*"
    assert bytes(live.received).endswith(b"Content-Length: 3\r\n\r\nOK\n")
    assert ready.head[0] == "HTTP/1.1 503 Service Unavailable"
    post = d.connect()
    post.get("/health/live", method="POST")
    assert post.head[0] == "HTTP/1.1 405 Method Not Allowed"


def test_the_demo_page_is_served_at_the_root_only_when_asked_for():
    plain, demo = MemoryDaemon(), MemoryDaemon({"DEMO_PAGE": "yes"})
    off, on = plain.connect(), demo.connect()
    off.get("/")
    on.get("/")
    assert off.head[0] == "HTTP/1.1 404 Not Found"
    assert on.head[0] == "HTTP/1.1 200 OK"
    assert on.head[1]["content-type"] == "text/html; charset=utf-8"
    assert b'new EventSource(new URL("subscribe/eps", base))' in on.received


def test_status_pages_filter_by_path_prefix_and_client():
    d = MemoryDaemon()
    for peer, path in (("10.0.0.1", "/subscribe/eps"), ("10.0.0.2", "/subscribe/details/1"),
                       ("10.0.0.1", "/subscribe/details/2")):
        d.connect(peer).get(path)
    d.advance(0)
    for query, expected in (("path=/subscribe/details", 2), ("client_ip=10.0.0.1", 2),
                            ("path=/subscribe/details&client_ip=10.0.0.1", 1), ("", 3)):
        client = d.connect()
        client.get(f"/admin/status.json?limit=10&{query}")
        d.advance(0)
        body = json.loads(client.body)
        assert body["connections_total"] == expected == len(body["connections"]), query
