"""Routes other than the streams' happy path: errors, CORS, admin status."""

from __future__ import annotations

import json
import time

import pytest_twisted

from sseclient import raw_connect, split_response


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
    # The longest valid ID is fine.
    _, reader = await client.stream("/subscribe/details/" + "x" * 64)
    reader.close()
    assert len(daemon.app.hub.in_namespace("/details/" + "x" * 64)) <= 1


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
