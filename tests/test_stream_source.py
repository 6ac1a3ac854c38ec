"""The stream source (--source streams) on a real Redis: the daemon serves details,
raw and eps from entries appended with the history's append script, each event's id
the stream's epoch and entry ID; CLIENT KILL under 400 entries a second loses and
repeats nothing (late, not lost); the README's demo command with --source streams."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from conftest import running
from daemonproc import TwistdProcess
from emojistream.demo import free_port
from emojistream.history import APPEND_SCRIPT, append_call, epoch_key, lease_key
from redisproc import RedisProcess
from sseclient import Client, within
from test_bridge import Redis

pytestmark = pytest.mark.slow

KEY = "emojistream:events"
SCORE = b"stream.score_updates"
DETAIL = b"stream.tweet_updates."


def append(redis: Redis, messages: list[tuple[bytes, bytes]]) -> Any:
    """As a bridge (or the demo feeder) appends: the history's script, unfenced."""
    keys, args = append_call(KEY, messages, maxlen=100_000, epoch_token="a1b2c3d4e5f60718")
    return redis("EVAL", APPEND_SCRIPT, len(keys), *keys, *args)


def entries(redis: Redis) -> list[tuple[str, bytes, bytes]]:
    """(entry ID, channel, payload) of every entry, oldest first."""
    return [(raw_id.decode(), fields[1], fields[3])
            for raw_id, fields in redis("XRANGE", KEY, "-", "+")]


def sleep(seconds: float) -> Any:
    return task.deferLater(reactor, seconds, lambda: None)


def env_for(server: RedisProcess) -> dict[str, str]:
    return {"REDIS_URL": server.url, "NODE_NAME": "streams.1",
            "EMOJISTREAM_SOURCE": "streams"}


@pytest_twisted.ensureDeferred
async def test_details_raw_and_eps_are_served_from_the_stream_with_its_ids(redis_server):
    redis = Redis(redis_server.port)
    try:
        append(redis, [(SCORE, b"2665")])  # before the node starts: not its to serve
        async with running(env_for(redis_server)) as (d, c):
            await within(d.app.feed.when_reading())
            epoch = redis("GET", epoch_key(KEY)).decode()
            _, details = await c.stream("/subscribe/details/2665")
            _, raw = await c.stream("/subscribe/raw")
            _, eps = await c.stream("/subscribe/eps")
            redis("SET", lease_key(KEY), "bridge-host/42/cafe", "PX", 60_000)
            sent = [(SCORE, b"2665"), (DETAIL + b"2665", b'{"n":1}'),
                    (SCORE, b"1F602"), (DETAIL + b"1F602", b'{"n":2}'),
                    (SCORE, b"2665"), (DETAIL + b"2665", '{"n":"\u2665"}'.encode())]
            append(redis, sent)
            await details.wait_events(2)
            await raw.wait_events(3)
            await eps.wait_for(lambda r: sum(
                sum(json.loads(e.data).values()) for e in r.events) >= 3)
            status: dict[str, Any] = {}
            for _ in range(50):  # the stream check runs every 2 s
                _, body = await c.text("GET", "/admin/status.json")
                status = json.loads(body)
                if status["stream"]["bridge"] is not None:
                    break
                await sleep(0.2)
            _, metrics = await c.text("GET", "/metrics")
        stored = entries(redis)[1:]
        assert [(c, p) for _, c, p in stored] == sent
        assert [(e.last_event_id, e.data.encode()) for e in raw.events] == [
            (f"{epoch}-{i}", p) for i, c, p in stored if c == SCORE]
        assert [(e.last_event_id, e.type, e.data.encode()) for e in details.events] == [
            (f"{epoch}-{i}", c.decode(), p) for i, c, p in stored if c == DETAIL + b"2665"]
        totals: dict[str, int] = {}
        for event in eps.events:
            for emoji, n in json.loads(event.data).items():
                totals[emoji] = totals.get(emoji, 0) + n
        assert totals == {"2665": 2, "1F602": 1}
        # A summary's id is the newest entry it covers.
        assert eps.events[-1].last_event_id == f"{epoch}-{stored[-1][0]}"
        assert status["source"] == "streams"
        stream = status["stream"]
        assert stream["epoch"] == epoch and stream["position"] == stored[-1][0]
        assert stream["length"] == 7 and stream["lag"] == 0
        assert stream["entries_read"] == 6 and stream["gaps"] == {"replaced": 0,
                                                                  "trimmed": 0}
        assert stream["bridge"]["holder"] == "bridge-host/42/cafe"
        assert 0 < stream["bridge"]["ttl_ms"] <= 60_000
        text = metrics.decode()
        assert 'emojistream_source{source="streams"} 1.0' in text
        assert "emojistream_stream_length 7.0" in text
        assert "emojistream_stream_entries_read_total 6.0" in text
        assert 'emojistream_stream_gaps_total{reason="trimmed"} 0.0' in text
        assert "emojistream_stream_bridge_active 1.0" in text
        assert "emojistream_replay_fetched_total" in text
    finally:
        redis.close()


class Appender:
    """Appends a score and a detail update 200 times a second (400 entries/s) from a
    thread, as a bridge would; between two appends, kills the other clients when
    asked (CLIENT KILL TYPE normal skips the connection that sends it)."""

    def __init__(self, port: int) -> None:
        self.redis = Redis(port)
        self.appended = 0
        self.kills = 0
        self._kill = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                emoji = b"%X" % (0x1F600 + n % 50)
                append(self.redis, [(SCORE, emoji), (DETAIL + emoji, b'{"n":%d}' % n)])
                self.appended += 1
                n += 1
                if self._kill.is_set():
                    self._kill.clear()
                    self.redis("CLIENT", "KILL", "TYPE", "normal")
                    self.kills += 1
                time.sleep(1 / 200)
        except BaseException as e:
            self.error = e

    def kill(self) -> None:
        self._kill.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.redis.close()


@pytest_twisted.ensureDeferred
async def test_client_kill_under_load_every_raw_event_arrives_once_in_order(redis_server):
    redis = Redis(redis_server.port)
    appender: Appender | None = None
    try:
        append(redis, [(SCORE, b"2665")])
        async with running(env_for(redis_server)) as (d, c):
            await within(d.app.feed.when_reading())
            epoch = redis("GET", epoch_key(KEY)).decode()
            _, raw = await c.stream("/subscribe/raw")
            appender = Appender(redis_server.port)
            for _ in range(3):
                await sleep(1.0)
                losses = d.app.feed.losses
                appender.kill()
                for _ in range(100):
                    if d.app.feed.losses > losses:
                        break
                    await sleep(0.05)
                assert d.app.feed.losses > losses
            await sleep(1.0)
            appender.stop()
            assert appender.error is None and appender.kills == 3
            redis.close()
            redis = Redis(redis_server.port)  # the kills ended the test's own too
            expected = [(f"{epoch}-{i}", p.decode()) for i, ch, p in entries(redis)[1:]
                        if ch == SCORE]
            await raw.wait_events(len(expected), 30)
            assert d.app.feed.gaps == {"replaced": 0, "trimmed": 0}
            assert d.app.feed.losses >= 3
        assert len(expected) >= 600
        assert [(e.last_event_id, e.data) for e in raw.events] == expected
    finally:
        if appender is not None:
            appender.stop()
        redis.close()


@pytest_twisted.ensureDeferred
async def test_the_readme_demo_command_with_streams_serves_the_stream_s_ids():
    port = free_port()
    demo = TwistdProcess("emojistream", "--demo", "--source", "streams",
                         "--listen", f"tcp:{port}:interface=127.0.0.1")
    client = Client(f"http://127.0.0.1:{port}")
    try:
        demo.port()
        demo.wait_for_line(r"Reading emojistream:events \(epoch [0-9a-f]+\) from its "
                           r"newest entry")
        _, raw = await client.stream("/subscribe/raw")
        _, details = await client.stream("/subscribe/details/1F602")
        await raw.wait_events(50)
        await details.wait_events(2)
        _, body = await client.text("GET", "/admin/status.json")
        status = json.loads(body)
        _, page = await client.text("GET", "/")
    finally:
        await client.close()
        code = demo.terminate()
    assert code == 0, demo.log()
    epoch = status["stream"]["epoch"]
    assert all(re.fullmatch(f"{epoch}-[0-9]+-[0-9]+", e.last_event_id) for e in raw.events)
    assert all(e.type == "stream.tweet_updates.1F602" for e in details.events)
    assert status["source"] == "streams" and status["stream"]["entries_read"] >= 50
    assert b"subscribe/eps" in page
    assert "Traceback" not in demo.log()
