"""The SSE routes end to end: real Redis, the daemon on a real port, real HTTP."""

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
async def test_details_are_delivered_per_id_in_order_and_to_ancestors(client, publisher):
    _, only_a = await client.stream("/subscribe/details/A")
    _, every = await client.stream("/subscribe/details")
    _, prefix = await client.stream("/subscribe/details/A1")
    sent = []
    for i in range(20):
        for emoji_id in ("A", "B"):
            payload = json.dumps({"id": emoji_id, "seq": i})
            sent.append((emoji_id, payload))
            await publisher.publish(f"stream.tweet_updates.{emoji_id}", payload)
    await only_a.wait_events(20)
    await every.wait_events(40)
    assert [(e.type, e.data) for e in only_a.events] == [
        (f"stream.tweet_updates.{i}", p) for i, p in sent if i == "A"
    ]
    assert [(e.type, e.data) for e in every.events] == [
        (f"stream.tweet_updates.{i}", p) for i, p in sent
    ]
    # The wire format is exactly event: then data:, no id: field.
    first = sent[0][1].encode()
    assert bytes(only_a.raw).startswith(b"event:stream.tweet_updates.A\ndata:" + first + b"\n\n")
    assert b"\nid:" not in bytes(every.raw) and not bytes(every.raw).startswith(b"id:")
    # /details/A1 is not an ancestor of /details/A, nor the other way round.
    assert prefix.events == []


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
async def test_raw_stream_sends_one_message_per_hit_in_order(client, publisher):
    _, raw = await client.stream("/subscribe/raw")
    ids = ["2665", "1F602", "2764", "2665", "1F1FA-1F1F8"]
    for emoji_id in ids:
        await publisher.publish("stream.score_updates", emoji_id)
    await raw.wait_events(len(ids))
    assert [e.data for e in raw.events] == ids
    assert bytes(raw.raw) == b"".join(b"data:%s\n\n" % i.encode() for i in ids)


@pytest_twisted.ensureDeferred
async def test_ids_stay_exact_strings(client, publisher):
    # "2764" must not become the number 2764 (nor "0031-20E3" anything else).
    _, raw = await client.stream("/subscribe/raw")
    _, eps = await client.stream("/subscribe/eps")
    for emoji_id in ("2764", "0031-20E3", "00A9"):
        await publisher.publish("stream.score_updates", emoji_id)
    await raw.wait_events(3)
    await eps.wait_for(lambda r: sum(sum(json.loads(e.data).values()) for e in r.events) == 3)
    assert [e.data for e in raw.events] == ["2764", "0031-20E3", "00A9"]
    keys = set().union(*(json.loads(e.data) for e in eps.events))
    assert keys == {"2764", "0031-20E3", "00A9"}


@pytest_twisted.ensureDeferred
async def test_line_breaks_in_payloads_become_data_lines(client, publisher):
    _, reader = await client.stream("/subscribe/details/X")
    payloads = [
        "one\ntwo\rthree\r\nfour",
        "event:evil\ndata:injected\n\nretry:1\nid:7",
        "\r\n\r\n",
        "trailing\n",
        " leading space",
        "",
    ]
    for p in payloads:
        await publisher.publish("stream.tweet_updates.X", p)
    await reader.wait_events(len(payloads))
    import re

    assert [e.data for e in reader.events] == [
        "\n".join(re.split(r"\r\n|\r|\n", p)) for p in payloads
    ]
    assert {e.type for e in reader.events} == {"stream.tweet_updates.X"}
    # Nothing but event: and data: fields reached the client.
    assert {name for name, _ in reader.parser.fields} == {"event", "data"}
    assert reader.parser.retries == []
    assert all(e.last_event_id == "" for e in reader.events)
    # The first payload arrives as four data: lines.
    assert b"data:one\ndata:two\ndata:three\ndata:four\n\n" in bytes(reader.raw)


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


@pytest_twisted.ensureDeferred
async def test_no_stream_goes_longer_than_the_keepalive_interval_without_a_byte(
        redis_server, publisher):
    """A message just after a keepalive tick used to leave the stream silent for
    almost two intervals; idle streams get about one keepalive per interval."""
    from twisted.internet.task import Clock

    from emojistream.sse import KEEPALIVE

    clock = Clock()
    env = {"REDIS_URL": redis_server.url, "SSE_KEEPALIVE_SEC": "15"}
    async with running(env, clock=clock) as (_d, c):
        _, reader = await c.stream("/subscribe/details/2665")

        async def sync(text: str) -> int:
            # Everything written before this event has arrived once it has.
            await publisher.publish("stream.tweet_updates.2665", text)
            await reader.wait_for(lambda r: r.events and r.events[-1].data == text)
            return len(reader.parser.comments)

        def advance(seconds: float, step: float = 0.25) -> None:
            for _ in range(round(seconds / step)):
                clock.advance(step)

        advance(3.25)  # just past a tick (every 3 s: five per interval)
        start = await sync("written just after a tick")
        advance(15)
        assert await sync("15 s later") == start + 1
        assert bytes(reader.raw).count(KEEPALIVE) == start + 1
        # Idle for a minute: keepalives 12 s apart once the stream went quiet (the
        # first 14.75 s after the last message: at 33, 45, 57 and 69 s), so at least
        # one per 15 s and not many more.
        before = len(reader.parser.comments)
        advance(60)
        assert await sync("a minute later") - before == 4
        before = len(reader.parser.comments)
        advance(120)  # 93, 105, ... 189 s: 9 where one per 15 s would be 8
        assert await sync("two minutes later") - before == 9
