"""The SSE routes end to end: real Redis, the daemon on a real port, real HTTP (what
the streams send as decided in code is tested in memory by test_memory_streams.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest_twisted

from conftest import running
from sseclient import raw_connect, split_response, within

SSE_HEADERS = {
    "content-type": ["text/event-stream; charset=utf-8"],
    "cache-control": ["no-cache"],
    "connection": ["keep-alive"],
    "access-control-allow-origin": ["*"],
    # Beyond the legacy contract: nginx passes the stream through unbuffered.
    "x-accel-buffering": ["no"],
}
# Added by the HTTP layer itself; everything else must be exactly the contract.
TRANSPORT_HEADERS = {"date", "server", "transfer-encoding"}


def exact_headers(raw: bytes, method: str) -> tuple[str, dict[str, str]]:
    status, headers, _ = split_response(raw)
    names = [name.lower() for name, _ in headers]
    assert len(names) == len(set(names)), f"repeated headers: {headers}"
    found = {name.lower(): value for name, value in headers}
    allowed = set(SSE_HEADERS) | TRANSPORT_HEADERS
    assert set(found) <= allowed, f"{method}: unexpected headers {set(found) - allowed}"
    for name, value in SSE_HEADERS.items():
        assert found.get(name) == value[0], f"{method}: {name} is {found.get(name)!r}"
    return status, found


@pytest_twisted.ensureDeferred
async def test_get_headers_are_exact_and_arrive_before_any_event(daemon):
    # Nothing is published: the headers must come anyway, at once.
    for path in ("/subscribe/eps", "/subscribe/raw", "/subscribe/details/2665",
                 "/subscribe/details"):
        conn = await raw_connect(daemon.port)
        conn.transport.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = await conn.wait_bytes(lambda b: b"\r\n\r\n" in b)
        status, headers = exact_headers(raw, "GET " + path)
        assert status == "HTTP/1.1 200 OK"
        assert headers["transfer-encoding"] == "chunked"
        # The stream stays open after the headers.
        assert not conn.is_closed
        conn.close()


@pytest_twisted.ensureDeferred
async def test_head_has_the_same_headers_and_completes(daemon, client):
    for path in ("/subscribe/eps", "/subscribe/raw", "/subscribe/details/1F602"):
        conn = await raw_connect(daemon.port)
        # HEAD, then a second request on the same connection: its answer can only
        # come once the HEAD response is complete.
        conn.transport.write(
            f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"
            "GET /admin/status.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            .encode()
        )
        await conn.wait_closed()
        head, _, second = bytes(conn.received).partition(b"\r\n\r\n")
        status, _ = exact_headers(head + b"\r\n\r\n", "HEAD " + path)
        assert status == "HTTP/1.1 200 OK"
        assert second.startswith(b"HTTP/1.1 200 OK\r\n"), second[:100]
        # And through an HTTP client library.
        response, body = await client.text("HEAD", path)
        assert response.code == 200 and body == b""
    # Nothing is left registered for a HEAD.
    assert len(daemon.app.hub) == 0


@pytest_twisted.ensureDeferred
async def test_eps_sums_are_exact_across_ticks_and_never_empty(client, publisher):
    _, eps = await client.stream("/subscribe/eps")
    expected: Counter[str] = Counter()
    ids = ["2665", "1F602", "1F1FA-1F1F8", "2764"]
    for batch in range(8):
        for i in range(25 + batch):
            emoji_id = ids[(i * 7 + batch) % len(ids)]
            expected[emoji_id] += 1
            await publisher.publish("stream.score_updates", emoji_id)
        # Wait for a summary, so the next batch falls into a later tick.
        seen = len(eps.events)
        await eps.wait_events(seen + 1)
    # A sentinel published last: once it shows, every earlier hit has been summarised.
    await publisher.publish("stream.score_updates", "END")
    await eps.wait_for(lambda r: any("END" in json.loads(e.data) for e in r.events))
    total: Counter[str] = Counter()
    for event in eps.events:
        summary = json.loads(event.data)
        assert summary, "an empty summary was sent"
        assert all(isinstance(v, int) and v > 0 for v in summary.values())
        total.update(summary)
    del total["END"]
    assert total == expected
    assert len(eps.events) >= 8
    # Compact JSON on one data: line.
    for line in bytes(eps.raw).split(b"\n"):
        assert line == b"" or (line.startswith(b"data:{") and b", " not in line
                               and b": " not in line)


@pytest_twisted.ensureDeferred
async def test_eps_sums_stay_exact_when_summaries_go_out_in_slices(daemon, client, publisher):
    # Three streams per reactor turn: each summary takes several turns, ticks that
    # come while one is still going out leave their hits to the next.
    daemon.app.hub._summary_slice = 3
    readers = [(await client.stream("/subscribe/eps"))[1] for _ in range(10)]
    expected: Counter[str] = Counter()
    ids = ["2665", "1F602", "2764"]
    for i in range(600):
        expected[ids[i % 3]] += 1
        await publisher.publish("stream.score_updates", ids[i % 3])
    await publisher.publish("stream.score_updates", "END")
    for reader in readers:
        await reader.wait_for(lambda r: any("END" in json.loads(e.data) for e in r.events))
        total: Counter[str] = Counter()
        for event in reader.events:
            total.update(json.loads(event.data))
        del total["END"]
        assert total == expected
    assert not daemon.app.summarizer._sending


@pytest_twisted.ensureDeferred
async def test_disconnected_client_leaves_its_pool_at_once(client, daemon, publisher):
    _, a = await client.stream("/subscribe/details/Q")
    _, b = await client.stream("/subscribe/details/Q")
    assert daemon.app.hub.pool_sizes()["detail"] == 2
    a.close()
    await within(a.closed)
    hub = daemon.app.hub
    # By the time a message has made the round trip through Redis, the server
    # has read the hang-up, which was sent first.
    await publisher.publish("stream.tweet_updates.Q", "after")
    await b.wait_events(1)
    assert hub.pool_sizes()["detail"] == 1
    (only,) = hub.in_namespace("/details/Q")
    assert only.writer.handed == 1


@pytest_twisted.ensureDeferred
async def test_keepalive_comments_flow_on_every_stream(redis_server):
    async with running({"REDIS_URL": redis_server.url, "SSE_KEEPALIVE_SEC": "0.05"}
                       ) as (_d, c):
        _, eps = await c.stream("/subscribe/eps")
        _, detail = await c.stream("/subscribe/details/2665")
        for reader in (eps, detail):
            await reader.wait_for(lambda r: len(r.parser.comments) >= 3)
            assert bytes(reader.raw).startswith(b":\n\n")
            assert reader.events == []


@pytest_twisted.ensureDeferred
async def test_demo_feeder_can_drive_a_given_redis(redis_server, publisher):
    async with running({"REDIS_URL": redis_server.url},
                       {"demo": "true", "demo_rate": "500"}) as (d, c):
        assert d.app.embedded_redis is None
        _, eps = await c.stream("/subscribe/eps")
        _, every = await c.stream("/subscribe/details")
        await eps.wait_events(5)
        await every.wait_events(5)
        # The daemon listens on the given Redis only, so that is where the hits went.
        assert (await publisher.execute_command("PUBSUB", "NUMPAT")) == 1
        assert all(e.type.startswith("stream.tweet_updates.") for e in every.events)
