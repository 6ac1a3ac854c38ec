"""Legacy connection management over real Redis and HTTP: forced refresh, cleanup,
client IPs, kiosk stream (one test of each feature; what is decided in code is tested
in memory by test_memory_legacy.py)."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.task import Clock

from conftest import running
from sseclient import raw_connect, split_response, within


def force_env(redis_server, **extra: str) -> dict[str, str]:
    env = {"REDIS_URL": redis_server.url, "SSE_FORCE_REFRESH": "true"}
    env.update(extra)
    return env


@pytest_twisted.ensureDeferred
async def test_forced_refresh_starts_with_retry_and_marks_the_response(redis_server):
    async with running(force_env(redis_server)) as (d, _c):
        for path, retry in (("/subscribe/eps", b"100"), ("/subscribe/raw", b"100"),
                            ("/subscribe/details/2665", b"500")):
            conn = await raw_connect(d.port)
            conn.transport.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            raw = await conn.wait_bytes(lambda b: b"\n\n" in b.partition(b"\r\n\r\n")[2])
            status, headers, body = split_response(raw)
            assert status == "HTTP/1.1 200 OK"
            assert ("X-Sse-Cleanup-Requested", "true") in headers
            # Chunked: the first chunk is exactly the retry hint.
            payload = b"retry:" + retry + b"\n\n"
            assert body.startswith(b"%x\r\n" % len(payload) + payload), body
            conn.close()


@pytest_twisted.ensureDeferred
async def test_streams_are_closed_at_their_maximum_age_on_the_clock(redis_server, publisher):
    clock = Clock()
    env = force_env(redis_server, SSE_SCORE_FORCECLOSE_SEC="30",
                    SSE_DETAIL_FORCECLOSE_SEC="60")
    async with running(env, clock=clock) as (d, c):
        _, eps = await c.stream("/subscribe/eps")
        _, detail = await c.stream("/subscribe/details/2665")
        clock.advance(29.9)
        await publisher.publish("stream.tweet_updates.2665", "still here")
        await detail.wait_events(1)
        assert not eps.is_closed and not detail.is_closed
        clock.advance(0.2)
        await within(eps.closed)
        assert not detail.is_closed
        assert d.app.hub.pool_sizes()["eps"] == 0
        clock.advance(30)
        await within(detail.closed)
        assert len(d.app.hub) == 0
        assert [e.data for e in detail.events] == ["still here"]


async def post(client, path, ip, body=b"", header="X-Forwarded-For"):
    response, content = await client.text("POST", path, data=body, headers={header: ip})
    return response, content


@pytest_twisted.ensureDeferred
async def test_cleanup_closes_exactly_the_callers_streams(redis_server, publisher):
    env = {"REDIS_URL": redis_server.url, "TRUST_PROXY": "yes"}
    async with running(env) as (d, c):
        a_ip, b_ip = "203.0.113.7", "198.51.100.9"

        async def open_as(ip, path):
            # What the client wrote comes first; the proxy appends the address it saw.
            _, reader = await c.stream(path, headers={"X-Forwarded-For": f"10.9.9.9, {ip}"})
            return reader

        a_eps = await open_as(a_ip, "/subscribe/eps")
        a_raw = await open_as(a_ip, "/subscribe/raw")
        a_x = await open_as(a_ip, "/subscribe/details/X")
        a_y = await open_as(a_ip, "/subscribe/details/Y")
        b_eps = await open_as(b_ip, "/subscribe/eps")
        b_x = await open_as(b_ip, "/subscribe/details/X")

        response, body = await post(c, "/subscribe/cleanup/scores", a_ip, body=b"\x00garbage{")
        assert response.code == 200
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        assert response.headers.getRawHeaders(b"access-control-allow-origin") == [b"*"]
        assert body == b'{"status":"OK","closed":2}'
        await within(a_eps.closed)
        await within(a_raw.closed)

        response, body = await post(c, "/subscribe/cleanup/details/X", a_ip)
        assert json.loads(body) == {"status": "OK", "closed": 1}
        await within(a_x.closed)

        # Nobody else's streams, nor the caller's other detail streams, were touched.
        await publisher.publish("stream.score_updates", "2665")
        await publisher.publish("stream.tweet_updates.X", "x")
        await publisher.publish("stream.tweet_updates.Y", "y")
        await b_eps.wait_events(1)
        await b_x.wait_events(1)
        await a_y.wait_events(1)
        assert not (b_eps.is_closed or b_x.is_closed or a_y.is_closed)
        status = d.app.status.document()
        assert sorted((s["client_ip"], s["request_path"]) for s in status["connections"]) == [
            (b_ip, "/subscribe/details/X"), (b_ip, "/subscribe/eps"),
            (a_ip, "/subscribe/details/Y")]

        # A client cannot pose as another: what it writes before the proxy's entry,
        # or an X-Real-IP the proxy does not set, is not believed.
        response, body = await post(c, "/subscribe/cleanup/scores", f"{b_ip}, 192.0.2.66")
        assert json.loads(body) == {"status": "OK", "closed": 0}
        response, body = await post(c, "/subscribe/cleanup/scores", b_ip, header="X-Real-IP")
        assert json.loads(body) == {"status": "OK", "closed": 0}
        response, body = await post(c, "/subscribe/cleanup/scores", b_ip)
        assert json.loads(body) == {"status": "OK", "closed": 1}
        # Nothing left to close answers 0, and a bad ID is a 400.
        response, body = await post(c, "/subscribe/cleanup/scores", b_ip)
        assert json.loads(body) == {"status": "OK", "closed": 0}
        response, body = await post(c, "/subscribe/cleanup/details/a.b", b_ip)
        assert response.code == 400


@pytest_twisted.ensureDeferred
async def test_kiosk_stream_when_enabled(redis_server, publisher):
    env = {"REDIS_URL": redis_server.url, "ENABLE_KIOSK_INTERACTION_STREAM": "1"}
    async with running(env) as (_d, c):
        _, kiosk = await c.stream("/subscribe/kiosk_interaction")
        await publisher.publish("stream.interaction.foo", '{"x":1}')
        await publisher.publish("stream.interaction.bar.baz", "two\nlines")
        # A channel name that is not UTF-8 is repaired like a payload.
        await publisher.publish(b"stream.interaction.caf\xc3\xa9\xff", "named oddly")
        await kiosk.wait_events(3)
        assert [(e.type, e.data) for e in kiosk.events] == [
            ("stream.interaction.foo", '{"x":1}'), ("stream.interaction.bar.baz", "two\nlines"),
            ("stream.interaction.caf\u00e9\ufffd", "named oddly")]
        assert bytes(kiosk.raw).startswith(b'event:stream.interaction.foo\ndata:{"x":1}\n\n')
        # What went out is valid UTF-8, as the Content-Type promises.
        bytes(kiosk.raw).decode("utf-8")
        patterns = await publisher.execute_command("PUBSUB", "NUMPAT")
        assert patterns == 2


@pytest_twisted.ensureDeferred
async def test_disabled_streams_are_404_and_cost_no_subscription(redis_server, publisher):
    env = {"REDIS_URL": redis_server.url, "ENABLE_RAW_STREAM": "false"}
    async with running(env) as (d, c):
        for path in ("/subscribe/kiosk_interaction", "/subscribe/raw"):
            response, _ = await c.text("GET", path)
            assert response.code == 404
        # Only the detail pattern; the score channel is needed for /eps anyway.
        assert await publisher.execute_command("PUBSUB", "NUMPAT") == 1
        channels = await publisher.execute_command("PUBSUB", "CHANNELS")
        assert channels == [b"stream.score_updates"]
        # And a kiosk message goes nowhere: no subscriber hears it, the daemon never
        # receives it, and a score published after it is all the daemon counts.
        assert await publisher.publish("stream.interaction.foo", "x") == 0
        _, eps = await c.stream("/subscribe/eps")
        await publisher.publish("stream.score_updates", "2665")
        await eps.wait_events(1)
        assert d.app.router.received == 1 and d.app.router.dropped == 0
