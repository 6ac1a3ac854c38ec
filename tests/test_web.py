"""Routes other than the streams' happy path: errors, CORS, admin status."""

from __future__ import annotations

import json
import time

import pytest_twisted

from sseclient import dechunk, raw_connect, response_events, split_response, within


async def get(client, method, path, **kw):
    response, body = await client.text(method, path, **kw)
    headers = {k.decode().lower(): [v.decode() for v in vs]
               for k, vs in response.headers.getAllRawHeaders()}
    return response.code, headers, body


@pytest_twisted.ensureDeferred
async def test_bad_ids_get_400_with_a_one_line_text_body(client, daemon):
    for emoji_id in ("a.b", "%3Cscript%3E", "a%20b", "x" * 65, "a%2Fb", "a/b", "..", "%00"):
        code, headers, body = await get(client, "GET", "/subscribe/details/" + emoji_id)
        assert code == 400, emoji_id
        assert headers["content-type"] == ["text/plain; charset=utf-8"]
        assert headers["access-control-allow-origin"] == ["*"]
        assert body.endswith(b"\n") and body.count(b"\n") == 1 and body.startswith(b"400 ")
    # The longest valid ID is fine: a stream of its own, gone once its client is.
    _, reader = await client.stream("/subscribe/details/" + "x" * 64)
    (stream,) = daemon.app.hub.in_namespace("/details/" + "x" * 64)
    reader.close()
    await within(stream.writer.when_finished())
    assert daemon.app.hub.in_namespace("/details/" + "x" * 64) == []


@pytest_twisted.ensureDeferred
async def test_unknown_paths_404_and_other_methods_405(client):
    for path in ("/", "/subscribe", "/subscribe/eps/", "/subscribe/nope", "/admin/x",
                 "/subscribe/kiosk_interaction"):
        code, headers, body = await get(client, "GET", path)
        assert code == 404, path
        assert headers["access-control-allow-origin"] == ["*"]
        assert headers["content-type"] == ["text/plain; charset=utf-8"]
        assert body == b"404 Not Found\n"
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/subscribe/eps", "/subscribe/raw", "/subscribe/details/2665"):
            code, headers, body = await get(client, method, path)
            assert code == 405, (method, path)
            assert headers["allow"] == ["GET, HEAD"]
            assert headers["access-control-allow-origin"] == ["*"]
            assert body == b"405 Method Not Allowed\n"


@pytest_twisted.ensureDeferred
async def test_status_json_lists_every_connection_oldest_first(client, daemon):
    before = int(time.time())
    paths = ["/subscribe/details/2665", "/subscribe/eps", "/subscribe/raw"]
    for path in paths:
        await client.stream(path, headers={"User-Agent": "agent " + path})
    code, headers, body = await get(client, "GET", "/admin/status.json")
    assert code == 200
    assert headers["content-type"] == ["application/json"]
    assert headers["access-control-allow-origin"] == ["*"]
    status = json.loads(body)
    assert status["node"] == "twisted-development-test.1"
    assert status["status"] == "OK"
    assert status["redis"] == "up"
    assert before <= status["reported_at"] <= time.time() + 1
    assert [c["request_path"] for c in status["connections"]] == paths
    created = [c["created_at"] for c in status["connections"]]
    assert created == sorted(created)
    first = status["connections"][0]
    assert set(first) == {"request_path", "namespace", "created_at", "client_ip",
                          "user_agent", "age", "tag", "msgs_sent"}
    assert first["namespace"] == "/details/2665"
    assert first["tag"] == "2665"
    assert first["client_ip"] == "127.0.0.1"
    assert first["user_agent"] == "agent /subscribe/details/2665"
    assert isinstance(first["created_at"], int) and before <= first["created_at"]
    assert first["age"] >= 0 and first["msgs_sent"] == 0
    assert status["pools"] == {"eps": 1, "raw": 1, "detail": 1, "kiosk": 0}


@pytest_twisted.ensureDeferred
async def test_admin_redirects_to_the_page_which_reads_status_json(client, daemon):
    conn = await raw_connect(daemon.port)
    conn.transport.write(b"GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await conn.wait_closed()
    status, headers, _ = split_response(bytes(conn.received))
    assert status.split()[1] in ("301", "308")
    found = dict(headers)
    assert found["Location"].endswith("/admin/")
    assert found["Access-Control-Allow-Origin"] == "*"
    code, headers, body = await get(client, "GET", "/admin/")
    assert code == 200
    assert headers["content-type"] == ["text/html; charset=utf-8"]
    assert b"status.json" in body


async def _exchange(port: int, data: bytes, until) -> bytes:
    conn = await raw_connect(port)
    conn.transport.write(data)
    received = await conn.wait_bytes(until)
    conn.close()
    return received


def _responses(raw: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """Split pipelined responses, each with a Content-Length or chunked."""
    out = []
    while raw:
        status, headers, rest = split_response(raw)
        found = {name.lower(): value for name, value in headers}
        if found.get("transfer-encoding") == "chunked":
            length = rest.index(b"0\r\n\r\n") + 5
            out.append((status, found, dechunk(rest[:length])))
        else:
            length = int(found["content-length"])
            out.append((status, found, rest[:length]))
        raw = rest[length:]
    return out


@pytest_twisted.ensureDeferred
async def test_redirects_carry_their_own_length_so_keep_alive_clients_go_on(daemon):
    two = (b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /admin/status.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await _exchange(daemon.port, two, lambda data: False)
    (status, headers, body), (second, _, document) = _responses(raw)
    assert status.startswith("HTTP/1.1 308 ")
    assert body == b"308 Permanent Redirect\n"
    assert int(headers.get("content-length", len(body))) == len(body)
    assert headers["location"] == "/admin/"
    assert headers["access-control-allow-origin"] == "*"
    assert second.startswith("HTTP/1.1 200 ") and json.loads(document)["status"] == "OK"


@pytest_twisted.ensureDeferred
async def test_cors_preflights_are_answered_204(daemon):
    for path, method, headers in (
            ("/subscribe/cleanup/scores", "POST", "content-type"),
            ("/subscribe/cleanup/details/2665", "POST", "Content-Type, X-Custom"),
            ("/admin/status.json", "GET", "authorization"),
            ("/subscribe/eps", "GET", "last-event-id")):
        request = (f"OPTIONS {path} HTTP/1.1\r\nHost: x\r\nOrigin: http://elsewhere.test\r\n"
                   f"Access-Control-Request-Method: {method}\r\n"
                   f"Access-Control-Request-Headers: {headers}\r\n"
                   "Connection: close\r\n\r\n").encode()
        raw = await _exchange(daemon.port, request, lambda data: False)
        status, found, body = split_response(raw)
        found = {name.lower(): value for name, value in found}
        assert status.startswith("HTTP/1.1 204 "), (path, raw)
        assert found["access-control-allow-origin"] == "*"
        assert method in found["access-control-allow-methods"].split(", ")
        assert found["access-control-allow-headers"] == headers
        assert int(found["access-control-max-age"]) > 0
        assert body == b""
    # Nothing a client writes can end up as a header line of its own.
    request = (b"OPTIONS /admin/status.json HTTP/1.1\r\nHost: x\r\n"
               b"Access-Control-Request-Headers: a:b\r\nConnection: close\r\n\r\n")
    _, found, _ = split_response(await _exchange(daemon.port, request, lambda data: False))
    assert dict(found)["Access-Control-Allow-Headers"] == (
        "Authorization, Content-Type, Last-Event-ID, Cache-Control")


@pytest_twisted.ensureDeferred
async def test_absolute_form_request_targets_are_served(daemon, publisher):
    request = (f"GET http://127.0.0.1:{daemon.port}/subscribe/details/2665 HTTP/1.1\r\n"
               "Host: ignored.example\r\n\r\n").encode()
    conn = await raw_connect(daemon.port)
    conn.transport.write(request)
    await conn.wait_bytes(lambda data: b"\r\n\r\n" in data)
    assert conn.received.startswith(b"HTTP/1.1 200 ")
    await publisher.publish("stream.tweet_updates.2665", "absolute")
    await conn.wait_bytes(lambda data: b"data:absolute" in data)
    conn.close()
    request = (f"GET HTTP://localhost:{daemon.port}/admin/status.json?x=1 HTTP/1.1\r\n"
               "Connection: close\r\n\r\n").encode()
    status, _, body = _responses(await _exchange(daemon.port, request, lambda data: False))[0]
    assert status.startswith("HTTP/1.1 200 ") and json.loads(body)["status"] == "OK"


@pytest_twisted.ensureDeferred
async def test_streams_say_connection_close_when_the_connection_will_close(daemon):
    for request, expected in (
            (b"GET /subscribe/eps HTTP/1.1\r\nHost: x\r\n\r\n", "keep-alive"),
            (b"GET /subscribe/eps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
             "close"),
            (b"GET /subscribe/eps HTTP/1.0\r\n\r\n", "close"),
            (b"HEAD /subscribe/eps HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", "close")):
        raw = await _exchange(daemon.port, request, lambda data: b"\r\n\r\n" in data)
        _, headers, _ = split_response(raw)
        assert dict(headers)["Connection"] == expected, request


@pytest_twisted.ensureDeferred
async def test_a_stream_asked_for_during_the_drain_is_told_to_come_back_later(
        redis_server):
    from conftest import start_daemon

    d = await start_daemon({"REDIS_URL": redis_server.url, "SSE_DRAIN_SEC": "2"})
    await within(d.app.feed.when_subscribed())
    # A keep-alive connection that has had one answer already.
    conn = await raw_connect(d.port)
    conn.transport.write(b"GET /admin/status.json HTTP/1.1\r\nHost: x\r\n\r\n")
    await conn.wait_bytes(lambda data: data.endswith(b"}") or b"0\r\n\r\n" in data)
    _, early = await _open(d.port, "/subscribe/eps")
    stopping = d.app.service.stopService()
    # The drain has begun once the open stream is told when to come back.
    await early.wait_bytes(lambda data: b"retry:" in data)
    before = len(conn.received)
    conn.transport.write(b"GET /subscribe/raw HTTP/1.1\r\nHost: x\r\n\r\n")
    await conn.wait_closed()
    answer = conn.received[before:]
    status, headers, _body = split_response(answer)
    assert status.startswith("HTTP/1.1 200 ")
    assert dict(headers)["Connection"] == "close"
    (retry,) = response_events(answer).retries
    assert 1000 <= retry <= 4000
    early.close()
    await within(stopping)


async def _open(port: int, path: str):
    conn = await raw_connect(port)
    conn.transport.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await conn.wait_bytes(lambda data: b"\r\n\r\n" in data)
    return None, conn


@pytest_twisted.ensureDeferred
async def test_status_json_is_built_once_a_second_and_pages_its_connections(redis_server):
    from twisted.internet.task import Clock

    from conftest import running

    clock = Clock()
    clock.advance(1_800_000_000)
    async with running({"REDIS_URL": redis_server.url}, clock=clock) as (d, c):
        for n in range(5):
            await c.stream("/subscribe/eps", headers={"User-Agent": f"ua {n}"})
        status = d.app.status
        before = status.builds
        bodies = set()
        for _ in range(20):
            response, body = await c.text("GET", "/admin/status.json?limit=10")
            bodies.add(body)
        # Twenty requests in one second: one document, the same bytes for each.
        assert status.builds == before + 1 and len(bodies) == 1
        assert len(json.loads(body)["connections"]) == 5
        clock.advance(1)
        _, body = await c.text("GET", "/admin/status.json?limit=2&offset=1")
        assert status.builds == before + 2
        page = json.loads(body)
        assert page["connections_total"] == 5 and page["offset"] == 1
        assert [x["user_agent"] for x in page["connections"]] == ["ua 1", "ua 2"]
        response, body = await c.text("GET", "/admin/status.json?limit=x")
        assert response.code == 400
        # A small document goes to anyone as often as asked...
        codes = [(await c.text("GET", "/admin/status.json"))[0].code for _ in range(3)]
        assert codes == [200, 200, 200]
        # ...a big one (thousands of streams) at most twice a second to one address.
        from emojistream.web import AdminRoutes

        status._cached = status._cached._replace(whole=b"x" * AdminRoutes.BIG_DOCUMENT)
        codes = [(await c.text("GET", "/admin/status.json"))[0].code for _ in range(3)]
        assert codes == [200, 200, 429]
        response, _ = await c.text("GET", "/admin/status.json?limit=1")
        assert response.code == 200
        clock.advance(1)
        response, _ = await c.text("GET", "/admin/status.json")
        assert response.code == 200
