"""Hostile and malformed input, over HTTP and from Redis: a proper status and a short
text body for each, never a traceback, and the daemon keeps serving."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.logger import globalLogPublisher

from sseclient import dechunk, raw_connect, split_response

CLOSE = b"Connection: close\r\n"

HTTP_CASES = [
    # (what, request bytes, expected status code)
    ("garbage request line", b"GARBAGE\r\n\r\n", 400),
    ("unknown HTTP version", b"GET /subscribe/eps HTTP/9.9\r\n\r\n", 400),
    ("missing version", b"GET /subscribe/eps\r\n\r\n", 400),
    ("NUL in the path", b"GET /subscribe/details/a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("overlong URL", b"GET /subscribe/details/" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
    ("overlong header", b"GET /subscribe/eps HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
     431),
    ("too many headers", b"GET /subscribe/eps HTTP/1.1\r\n"
     + b"".join(b"X-%d: y\r\n" % i for i in range(600)) + b"\r\n", 431),
    ("bad Content-Length", b"POST /subscribe/cleanup/scores HTTP/1.1\r\nContent-Length: x\r\n"
     b"\r\n", 400),
    ("unknown method", b"BREW /subscribe/eps HTTP/1.1\r\n" + CLOSE + b"\r\n", 405),
    ("unknown method, unknown path", b"BREW /teapot HTTP/1.1\r\n" + CLOSE + b"\r\n", 404),
    ("path traversal", b"GET /subscribe/details/../../etc/passwd HTTP/1.1\r\n" + CLOSE
     + b"\r\n", 400),
    ("encoded slash in an ID", b"GET /subscribe/details/a%2Fb HTTP/1.1\r\n" + CLOSE + b"\r\n",
     400),
    ("encoded dot-dot", b"GET /subscribe/details/%2e%2e HTTP/1.1\r\n" + CLOSE + b"\r\n", 400),
    ("non-UTF-8 escape", b"GET /subscribe/details/%ff%fe HTTP/1.1\r\n" + CLOSE + b"\r\n", 400),
    ("body on a GET", b"GET /admin/status.json HTTP/1.1\r\nContent-Length: 5\r\n" + CLOSE
     + b"\r\nhello", 200),
    ("query string on status", b"GET /admin/status.json?a=1&b HTTP/1.1\r\n" + CLOSE + b"\r\n",
     200),
    ("garbage body on cleanup", b"POST /subscribe/cleanup/scores HTTP/1.1\r\n"
     b"Content-Length: 5\r\nContent-Type: application/json\r\n" + CLOSE + b"\r\n\x00\xff{\"a",
     200),
    ("non-UTF-8 Host", b"GET /subscribe/eps HTTP/1.1\r\nHost: \xff\xfe\r\n" + CLOSE
     + b"\r\n", 400),
    ("Host with a space", b"GET /admin/status.json HTTP/1.1\r\nHost: a b\r\n" + CLOSE
     + b"\r\n", 400),
    ("encoded CRLF after an ID", b"GET /subscribe/details/2665%0d%0a HTTP/1.1\r\n" + CLOSE
     + b"\r\n", 400),
    ("encoded LF in a cleanup ID", b"POST /subscribe/cleanup/details/26%0a65 HTTP/1.1\r\n"
     + CLOSE + b"\r\n", 400),
    ("big body on cleanup", b"POST /subscribe/cleanup/details/2665 HTTP/1.1\r\n"
     b"Content-Length: 2000000\r\n" + CLOSE + b"\r\n" + b"z" * 2_000_000, 200),
]


async def exchange(port: int, data: bytes) -> bytes:
    conn = await raw_connect(port)
    conn.transport.write(data)
    await conn.wait_closed()
    return conn.received


@pytest_twisted.ensureDeferred
async def test_each_hostile_request_gets_a_status_and_a_short_text_body(daemon, client,
                                                                        publisher):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for what, data, code in HTTP_CASES:
            raw = await exchange(daemon.port, data)
            status, headers, body = split_response(raw)
            assert status.startswith(f"HTTP/1.1 {code} "), (what, raw[:200])
            found = {name.lower(): value for name, value in headers}
            if found.get("transfer-encoding") == "chunked":
                body = dechunk(body)
            assert found.get("access-control-allow-origin") == "*", what
            if code != 200:
                assert found["content-type"] == "text/plain; charset=utf-8", what
                assert body.startswith(str(code).encode()) and len(body) < 200, (what, body)
                assert body.count(b"\n") == 1, what
            else:
                json.loads(body)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "log_failure" in e], "a traceback was logged"
    # The query string of a stream route is ignored, and the daemon still streams.
    _, reader = await client.stream("/subscribe/details/2665?since=0&x=%ff")
    await publisher.publish("stream.tweet_updates.2665", "still serving")
    await reader.wait_events(1)
    assert reader.events[0].data == "still serving"


@pytest_twisted.ensureDeferred
async def test_odd_redis_messages_are_delivered_safely_or_dropped_and_counted(
        daemon, client, publisher):
    router = daemon.app.router
    _, every = await client.stream("/subscribe/details")
    _, raw = await client.stream("/subscribe/raw")
    big = "x" * (64 * 1024 + 1)
    await publisher.publish("stream.tweet_updates.A", "")                    # empty: delivered
    await publisher.publish("stream.tweet_updates.A", b"caf\xc3\xa9 \xff\xfe ok")  # bad UTF-8
    await publisher.publish("stream.tweet_updates.A", big)                    # too big: dropped
    await publisher.publish("stream.tweet_updates.", "empty suffix")          # dropped
    await publisher.publish("stream.tweet_updates.a.b", "dotted suffix")      # dropped
    await publisher.publish("stream.tweet_updates.a b", "space")              # dropped
    await publisher.publish("stream.score_updates", "")                       # dropped
    await publisher.publish("stream.score_updates", "12\n34")                 # dropped
    await publisher.publish("stream.score_updates", b"\xff")                  # dropped
    await publisher.publish("stream.tweet_updates.A", "last")
    await publisher.publish("stream.score_updates", "2665")
    await every.wait_events(3)
    await raw.wait_events(1)
    assert [(e.type, e.data) for e in every.events] == [
        ("stream.tweet_updates.A", ""),
        ("stream.tweet_updates.A", "café \ufffd\ufffd ok"),
        ("stream.tweet_updates.A", "last"),
    ]
    # What went out is valid UTF-8, as the Content-Type promises.
    bytes(every.raw).decode("utf-8")
    assert [e.data for e in raw.events] == ["2665"]
    assert router.received == 11
    assert router.dropped == 7 and router.oversized == 1


@pytest_twisted.ensureDeferred
async def test_2000_pipelined_requests_with_a_bad_host_log_nothing(daemon, logs):
    request = b"GET /subscribe/eps HTTP/1.1\r\nHost: \xff\r\n\r\n"
    conn = await raw_connect(daemon.port)
    conn.transport.write(request * 1999 + request.replace(b"\r\n\r\n",
                                                          b"\r\n" + CLOSE + b"\r\n"))
    raw = await conn.wait_closed()
    assert bytes(raw.received).count(b"HTTP/1.1 400 ") == 2000
    assert not logs.failures() and not logs.ours()
