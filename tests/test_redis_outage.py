"""The daemon against a Redis that goes away and comes back."""

from __future__ import annotations

import json

import pytest_twisted
import txredisapi

from conftest import running
from redisproc import RedisProcess
from sseclient import within


async def connect(server: RedisProcess):
    return await within(txredisapi.Connection(
        "127.0.0.1", server.port, reconnect=False, convertNumbers=False, charset=None
    ))


@pytest_twisted.ensureDeferred
async def test_redis_restart_under_a_connected_client(daemon, client, redis_server):
    _, reader = await client.stream("/subscribe/details/2665")
    pub = await connect(redis_server)
    await pub.publish("stream.tweet_updates.2665", "before")
    await reader.wait_events(1)
    await pub.disconnect()

    redis_server.stop()
    await within(daemon.app.feed.when_state("down"))
    code, body = await status(client)
    assert code == 200
    assert body["status"] != "OK" and body["redis"] == "down"
    redis_server.start()
    await within(daemon.app.feed.when_state("up"))

    pub = await connect(redis_server)
    try:
        for i in range(5):
            await pub.publish("stream.tweet_updates.2665", f"after {i}")
        await reader.wait_events(6)
        # A last message: once it is in, any duplicate of the earlier ones would be too.
        await pub.publish("stream.tweet_updates.2665", "last")
        await reader.wait_events(7)
    finally:
        await pub.disconnect()
    assert [e.data for e in reader.events] == ["before"] + [f"after {i}" for i in range(5)] + [
        "last"]
    assert not reader.is_closed
    assert len(daemon.app.hub.in_namespace("/details/2665")) == 1
    _code, body = await status(client)
    assert body["status"] == "OK"


async def status(client):
    response, body = await client.text("GET", "/admin/status.json")
    return response.code, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_daemon_serves_while_redis_is_down_and_subscribes_when_it_comes():
    server = RedisProcess()  # chosen port, not started yet
    try:
        async with running({"REDIS_URL": server.url}, subscribed=False) as (d, c):
            code, body = await status(c)
            assert code == 200
            assert body["status"] != "OK"
            assert body["redis"] in ("connecting", "down")
            _, reader = await c.stream("/subscribe/raw")
            server.start()
            await within(d.app.feed.when_state("up"))
            pub = await connect(server)
            await pub.publish("stream.score_updates", "1F602")
            await reader.wait_events(1)
            await pub.disconnect()
            assert reader.events[0].data == "1F602"
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_password_and_database_come_from_the_url():
    server = RedisProcess(extra_args=("--requirepass", "s3cret"))
    server.start()
    try:
        async with running({"REDIS_URL": f"redis://:s3cret@127.0.0.1:{server.port}/3"}
                           ) as (_d, c):
            _, reader = await c.stream("/subscribe/details/2665")
            pub = await within(txredisapi.Connection(
                "127.0.0.1", server.port, password="s3cret", reconnect=False,
                convertNumbers=False, charset=None))
            await pub.publish("stream.tweet_updates.2665", "with auth")
            await reader.wait_events(1)
            await pub.disconnect()
            assert reader.events[0].data == "with auth"
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_reported_not_fatal():
    server = RedisProcess(extra_args=("--requirepass", "right"))
    server.start()
    try:
        async with running({"REDIS_URL": f"redis://:wrong@127.0.0.1:{server.port}"},
                           subscribed=False) as (d, c):
            await within(d.app.feed.when_state("down"))
            code, body = await status(c)
            assert code == 200 and body["redis"] == "down"
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_redis_killed_under_100_clients_and_back_3_s_later(daemon, client, redis_server):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    readers = []
    for i in range(100):
        path = "/subscribe/details" if i % 2 else "/subscribe/details/2665"
        readers.append((await client.stream(path))[1])
    redis_server.kill()  # SIGKILL: no goodbye to anyone
    await within(daemon.app.feed.when_state("down"))
    code, body = await status(client)
    assert code == 200 and body["status"] != "OK" and body["redis"] == "down"
    # The outage lasts 3 s (part of the scenario, not a wait for something).
    await deferLater(reactor, 3, lambda: None)
    code, body = await status(client)
    assert body["redis"] == "down" and len(body["connections"]) == 100
    redis_server.start()
    await within(daemon.app.feed.when_state("up"))
    pub = await connect(redis_server)
    try:
        sent = [f"after {i}" for i in range(10)] + ["last"]
        for message in sent:
            await pub.publish("stream.tweet_updates.2665", message)
    finally:
        await pub.disconnect()
    for reader in readers:
        await reader.wait_events(len(sent))
    for reader in readers:
        # Had anything come twice, it would show before "last".
        assert [e.data for e in reader.events] == sent
        assert not reader.is_closed
    code, body = await status(client)
    assert body["status"] == "OK" and len(body["connections"]) == 100
    assert daemon.app.hub.closed == 0


@pytest_twisted.ensureDeferred
async def test_a_slow_redis_stalls_nobody(redis_server, publisher):
    env = {"REDIS_URL": redis_server.url, "SSE_KEEPALIVE_SEC": "0.05", "ADMIN_REPORT": "1"}
    async with running(env) as (_d, c):
        _, reader = await c.stream("/subscribe/details/2665")
        # Redis stops answering commands for 1.5 s...
        await publisher.execute_command("CLIENT", "PAUSE", "1500")
        before = len(reader.parser.comments)
        # ...while the daemon goes on: keepalives flow and status answers.
        await reader.wait_for(lambda r: len(r.parser.comments) >= before + 5)
        code, body = await status(c)
        assert code == 200 and len(body["connections"]) == 1
        pub = await connect(redis_server)
        await pub.publish("stream.tweet_updates.2665", "after the stall")
        await pub.disconnect()
        await reader.wait_events(1)
        assert [e.data for e in reader.events] == ["after the stall"]
        assert not reader.is_closed


@pytest_twisted.ensureDeferred
async def test_a_subscriber_killed_by_redis_is_logged_once_counted_and_replaced(
        daemon, client, redis_server, publisher, logs):
    feed = daemon.app.feed
    _, reader = await client.stream("/subscribe/details/2665")
    await publisher.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await within(feed.when_state("down"))
    code, body = await status(client)
    assert code == 200
    assert body["status"] != "OK" and body["redis"] == "down"
    await within(feed.when_state("up"))
    assert feed.losses == 1
    lost = [line for line in logs.ours() if "was lost" in line]
    assert len(lost) == 1 and "subscriber" in lost[0]
    await publisher.publish("stream.tweet_updates.2665", "after")
    await reader.wait_events(1)
    _code, body = await status(client)
    assert body["status"] == "OK" and body["totals"]["redis.subscriber_losses"] == 1


@pytest_twisted.ensureDeferred
async def test_a_subscriber_dropped_at_the_pubsub_buffer_limit_is_noticed(
        daemon, client, redis_server, publisher, logs):
    feed = daemon.app.feed
    # Any pending output makes Redis drop a subscriber: what a burst does to one
    # whose client falls behind at the default 32 MB.
    await publisher.execute_command("CONFIG", "SET", "client-output-buffer-limit",
                                    "pubsub 1 1 0")
    await publisher.publish("stream.tweet_updates.2665", "x" * 200_000)
    await within(feed.when_state("down"))
    await publisher.execute_command("CONFIG", "SET", "client-output-buffer-limit",
                                    "pubsub 32mb 8mb 60")
    await within(feed.when_state("up"))
    assert feed.losses >= 1
    assert [line for line in logs.ours() if "was lost" in line]


@pytest_twisted.ensureDeferred
async def test_health_ready_follows_the_redis_subscription(daemon, client, redis_server):
    import time

    async def ready() -> int:
        response, _ = await client.text("GET", "/health/ready")
        return int(response.code)

    assert await ready() == 200
    killed = time.monotonic()
    redis_server.kill()
    await within(daemon.app.feed.when_state("down"))
    assert await ready() == 503
    assert time.monotonic() - killed < 1
    response, body = await client.text("GET", "/health/live")
    assert response.code == 200 and body == b"OK\n"
    redis_server.start()
    await within(daemon.app.feed.when_state("up"))
    subscribed = time.monotonic()
    assert await ready() == 200
    assert time.monotonic() - subscribed < 1
