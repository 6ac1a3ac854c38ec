"""Stream limits, and locking the admin status down."""

from __future__ import annotations

import json

import pytest_twisted

from conftest import running
from emojistream.demo import free_port
from sseclient import Client


@pytest_twisted.ensureDeferred
async def test_streams_beyond_the_limit_get_503_with_retry_after(redis_server):
    async with running({"REDIS_URL": redis_server.url, "MAX_STREAMS": "3"}) as (d, c):
        for path in ("/subscribe/eps", "/subscribe/raw", "/subscribe/details/A"):
            response, _ = await c.stream(path)
            assert response.code == 200
        response, body = await c.text("GET", "/subscribe/details/B")
        assert response.code == 503
        assert response.headers.getRawHeaders(b"retry-after") == [b"10"]
        assert body.startswith(b"503 ") and body.endswith(b"\n")
        # Refused before any state: the hub still holds exactly three.
        assert len(d.app.hub) == 3
        # HEAD costs nothing and is still answered.
        response, _ = await c.text("HEAD", "/subscribe/eps")
        assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_per_client_ip_limit_answers_429(redis_server):
    env = {"REDIS_URL": redis_server.url, "MAX_STREAMS_PER_IP": "2", "TRUST_PROXY": "1"}
    async with running(env) as (d, c):
        a = {"X-Forwarded-For": "203.0.113.1"}
        b = {"X-Forwarded-For": "203.0.113.2"}
        for _ in range(2):
            response, _ = await c.stream("/subscribe/eps", headers=a)
            assert response.code == 200
        response, body = await c.text("GET", "/subscribe/eps", headers=a)
        assert response.code == 429 and body.startswith(b"429 ")
        assert response.phrase == b"Too Many Requests"
        assert response.headers.getRawHeaders(b"retry-after") == [b"10"]
        response, _ = await c.stream("/subscribe/eps", headers=b)
        assert response.code == 200
        assert d.app.hub.from_ip("203.0.113.1") == 2


@pytest_twisted.ensureDeferred
async def test_admin_on_its_own_endpoint_is_gone_from_the_main_one(redis_server):
    admin_port = free_port()
    env = {"REDIS_URL": redis_server.url,
           "ADMIN_LISTEN": f"tcp:{admin_port}:interface=127.0.0.1"}
    async with running(env) as (_d, c):
        for path in ("/admin/status.json", "/admin/", "/admin"):
            response, _ = await c.text("GET", path)
            assert response.code == 404, path
        admin = Client(f"http://127.0.0.1:{admin_port}")
        try:
            response, body = await admin.text("GET", "/admin/status.json")
            assert response.code == 200 and json.loads(body)["status"] == "OK"
            response, _ = await admin.text("GET", "/subscribe/eps")
            assert response.code == 404
        finally:
            await admin.close()


@pytest_twisted.ensureDeferred
async def test_admin_token_is_required_when_set(redis_server):
    token = "s3cret-token-0123456789"
    env = {"REDIS_URL": redis_server.url, "ADMIN_TOKEN": token}
    async with running(env) as (_d, c):
        response, body = await c.text("GET", "/admin/status.json")
        assert response.code == 401 and body.startswith(b"401 ")
        assert response.headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer")
        response, _ = await c.text("GET", "/admin/status.json",
                                   headers={"Authorization": "Bearer wrong"})
        assert response.code == 401
        response, body = await c.text("GET", "/admin/status.json",
                                      headers={"Authorization": f"Bearer {token}"})
        assert response.code == 200 and json.loads(body)["status"] == "OK"
        # The page holds no data and loads; its script sends the token.
        response, page = await c.text("GET", "/admin/")
        assert response.code == 200 and b"Authorization" in page


@pytest_twisted.ensureDeferred
async def test_the_payload_limit_is_for_details_not_score_ids(redis_server, publisher):
    env = {"REDIS_URL": redis_server.url, "MAX_PAYLOAD_BYTES": "3"}
    async with running(env) as (d, c):
        _, raw = await c.stream("/subscribe/raw")
        _, details = await c.stream("/subscribe/details")
        await publisher.publish("stream.tweet_updates.1F602", "long")   # over 3 bytes
        await publisher.publish("stream.tweet_updates.1F602", "ok")
        await publisher.publish("stream.score_updates", "1F1FA-1F1F8")    # an ID, not a payload
        await details.wait_events(1)
        await raw.wait_events(1)
        assert [e.data for e in details.events] == ["ok"]
        assert [e.data for e in raw.events] == ["1F1FA-1F1F8"]
        assert d.app.router.oversized == 1 and d.app.router.dropped == 1
