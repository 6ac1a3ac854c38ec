"""The bridge as operators run it (`twistd -n emojistream-bridge`) on a real Redis, and
its scripts on a real Redis: what is PUBLISHed lands in the stream once, in order,
exactly as sent, across two bridges, a kill -9 and a SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import hiredis
import pytest
import pytest_twisted
from twisted.internet import reactor

from conftest import repo_env
from daemonproc import TWISTD, TwistdProcess
from emojistream.bridge import RedisHistory
from emojistream.config import CONFIG_ERROR_EXIT, parse_redis_url
from emojistream.demo import free_port
from emojistream.history import decode_entry, epoch_key, lease_key, release_channel
from emojistream.redisconn import RedisConnection
from redisproc import RedisProcess
from sseclient import within

pytestmark = pytest.mark.slow

KEY = "emojistream:events"


class Redis:
    """A blocking Redis client for the test's side (PUBLISH, XRANGE, ...)."""

    def __init__(self, port: int) -> None:
        self._socket = socket.create_connection(("127.0.0.1", port), timeout=30)
        self._reader = hiredis.Reader()

    def close(self) -> None:
        self._socket.close()

    def pipeline(self, *commands: tuple[Any, ...]) -> list[Any]:
        out = b""
        for args in commands:
            parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
            out += b"*%d\r\n" % len(parts) + b"".join(
                b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self._socket.sendall(out)
        return [self.next_reply() for _ in commands]

    def next_reply(self) -> Any:
        """The next thing Redis sends (a subscriber's next message)."""
        while (reply := self._reader.gets()) is False:
            chunk = self._socket.recv(1 << 20)
            assert chunk, "Redis closed the connection"
            self._reader.feed(chunk)
        return reply

    def __call__(self, *args: Any) -> Any:
        reply = self.pipeline(args)[0]
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply

    def entries(self, key: str = KEY) -> list[tuple[bytes, bytes]]:
        return [decode_entry(fields) for _id, fields in self("XRANGE", key, "-", "+")]

    def wait_for_length(self, n: int, key: str = KEY, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self("XLEN", key) < n:
            assert time.monotonic() < deadline, f"XLEN {self('XLEN', key)}, not {n}"
            time.sleep(0.05)


@pytest.fixture
def redis(redis_server: RedisProcess) -> Iterator[Redis]:
    client = Redis(redis_server.port)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def bridges() -> Iterator[list[TwistdProcess]]:
    """Bridges started by a test, all ended at its end (also on failure)."""
    started: list[TwistdProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait()


def start_bridge(bridges: list[TwistdProcess], url: str, *args: str,
                 env: dict[str, str] | None = None) -> TwistdProcess:
    proc = TwistdProcess("emojistream-bridge", "--redis", url, *args, env=env)
    bridges.append(proc)
    return proc


ACTIVE = r"Bridge (\S+) is the active bridge: appending to "
STANDBY = r"Bridge (\S+) stands by: bridge (\S+) appends to "


class Publisher:
    """Publishes score and detail updates (random-ish IDs, unique details) from a
    thread, as the feeder does, until stopped; remembers what it published."""

    def __init__(self, port: int, per_second: float = 200) -> None:
        self.sent: list[tuple[bytes, bytes]] = []
        self._redis = Redis(port)
        self._stop = threading.Event()
        self._interval = 1 / per_second
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            emoji = b"%X" % (0x1F600 + n * 7919 % 37)
            batch = [(b"stream.score_updates", emoji),
                     (b"stream.tweet_updates." + emoji, b'{"id":"%d"}' % n)]
            self._redis.pipeline(*[("PUBLISH", c, p) for c, p in batch])
            self.sent += batch
            n += 1
            time.sleep(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._redis.close()


def wait_until_appended(redis: Redis, sent: list[tuple[bytes, bytes]],
                        timeout: float = 30) -> list[tuple[bytes, bytes]]:
    """The stream once its newest entry is the last message published."""
    deadline = time.monotonic() + timeout
    while True:
        newest = redis("XREVRANGE", KEY, "+", "-", "COUNT", 1)
        if newest and decode_entry(newest[0][1]) == sent[-1]:
            return redis.entries()
        assert time.monotonic() < deadline, "the last message never reached the stream"
        time.sleep(0.05)


def test_published_messages_land_in_the_stream_in_order_as_c_and_p_exactly(
        redis_server, redis, bridges):
    bridge = start_bridge(bridges, redis_server.url, "--kiosk-stream", "--lease", "2")
    bridge.wait_for_line(ACTIVE)
    bridge.wait_for_line(r"Redis subscriber connection .* is up")
    sent = [
        (b"stream.score_updates", b"2665"),
        (b"stream.tweet_updates.2665", '{"text":"I \u2665 it \U0001F602"}'.encode()),
        (b"stream.interaction.kiosk-1", b'{"id":"1F602"}'),
        (b"stream.score_updates", b"1F602"),
        (b"stream.tweet_updates.1F602", b"\x00\xff not even utf-8 \r\n"),
    ]
    replies = redis.pipeline(*[("PUBLISH", c, p) for c, p in sent],
                             ("PUBLISH", "unrelated.channel", "x"))
    assert replies[:5] == [1] * 5  # one subscriber: the bridge
    redis.wait_for_length(len(sent))
    raw = redis("XRANGE", KEY, "-", "+")
    assert [fields for _id, fields in raw] == [[b"c", c, b"p", p] for c, p in sent]
    epoch = redis("GET", epoch_key(KEY))
    assert epoch and len(epoch) == 16
    # The stream replaced: the next append starts a new epoch.
    redis("DEL", KEY)
    redis("PUBLISH", "stream.score_updates", "2764")
    redis.wait_for_length(1)
    assert redis.entries() == [(b"stream.score_updates", b"2764")]
    assert redis("GET", epoch_key(KEY)) not in (None, epoch)
    # Redis forgot the scripts (SCRIPT FLUSH, a restart): EVAL loads them again.
    redis("SCRIPT", "FLUSH")
    redis("PUBLISH", "stream.score_updates", "2765")
    redis.wait_for_length(2)
    assert bridge.terminate() == 0
    assert "Traceback" not in bridge.log()
    assert redis("EXISTS", lease_key(KEY)) == 0


def test_two_bridges_each_message_once_and_a_kill_9_hands_over_within_a_lease(
        redis_server, redis, bridges):
    lease = 2.0
    a = start_bridge(bridges, redis_server.url, "--lease", f"{lease:g}")
    a_id = a.wait_for_line(ACTIVE).group(1)
    b = start_bridge(bridges, redis_server.url, "--lease", f"{lease:g}")
    assert b.wait_for_line(STANDBY).group(2) == a_id
    publisher = Publisher(redis_server.port)
    try:
        while len(publisher.sent) < 400:
            time.sleep(0.05)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        killed = time.monotonic()
        b.wait_for_line(ACTIVE, timeout=30)
        took = time.monotonic() - killed
        count = len(publisher.sent)
        while len(publisher.sent) < count + 400:
            time.sleep(0.05)
    finally:
        publisher.stop()
    # The lease, plus a renewal interval at most, plus the loaded machine's slack.
    assert took < lease + lease / 3 + 2, took
    stream = wait_until_appended(redis, publisher.sent)
    assert stream == publisher.sent  # each once, in order, none missing


def test_sigterm_gives_the_lease_up_and_the_standby_takes_over_at_once(
        redis_server, redis, bridges):
    lease = 30.0  # waiting it out, or even a renewal interval, would show
    a = start_bridge(bridges, redis_server.url, "--lease", f"{lease:g}")
    a.wait_for_line(ACTIVE)
    b = start_bridge(bridges, redis_server.url, "--lease", f"{lease:g}")
    b.wait_for_line(STANDBY)
    publisher = Publisher(redis_server.port)
    try:
        while len(publisher.sent) < 400:
            time.sleep(0.05)
        stopped = time.monotonic()
        assert a.terminate() == 0
        b.wait_for_line(ACTIVE, timeout=lease / 3)
        took = time.monotonic() - stopped
        count = len(publisher.sent)
        while len(publisher.sent) < count + 400:
            time.sleep(0.05)
    finally:
        publisher.stop()
    assert took < lease / 3, took
    a.wait_for_line(r"Bridge \S+ released the lease on emojistream:events")
    stream = wait_until_appended(redis, publisher.sent)
    assert stream == publisher.sent


def test_maxlen_keeps_the_stream_near_n(redis_server, redis, bridges):
    bridge = start_bridge(bridges, redis_server.url, "--stream-maxlen", "1000")
    bridge.wait_for_line(ACTIVE)
    bridge.wait_for_line(r"Redis subscriber connection .* is up")
    sent = [(b"stream.score_updates", b"%d" % n) for n in range(5000)]
    for start in range(0, len(sent), 500):
        redis.pipeline(*[("PUBLISH", c, p) for c, p in sent[start:start + 500]])
    stream = wait_until_appended(redis, sent)
    # MAXLEN ~ trims whole nodes (100 entries each by default): a little more stays.
    assert 1000 <= len(stream) <= 1100, len(stream)
    assert stream == sent[-len(stream):]
    assert bridge.terminate() == 0


@pytest.mark.parametrize(("args", "env", "says"), [
    (["--lease", "0.1"], {}, "--lease: '0.1' is too short: at least 1 s"),
    (["--stream-key", "a b"], {}, "--stream-key: 'a b' is not a stream key"),
    ([], {"EMOJISTREAM_STREAM_MAXLEN": "-1"}, "EMOJISTREAM_STREAM_MAXLEN: '-1' must be"),
    ([], {"REDIS_URL": "http://localhost"}, "REDIS_URL: 'http://localhost' is not a redis"),
    ([], {"ENABLE_KIOSK_INTERACTION_STREAM": "maybe"}, "ENABLE_KIOSK_INTERACTION_STREAM:"),
])
def test_a_bad_setting_is_one_line_and_exit_78(args, env, says, tmp_path):
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "emojistream-bridge", *args],
                            capture_output=True, text=True, env={**repo_env(), **env},
                            timeout=60, cwd=tmp_path)
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == CONFIG_ERROR_EXIT, out
    assert out.splitlines() == [out] and out.startswith("twistd emojistream-bridge: "), out
    assert says in out


def test_redis_unreachable_at_start_is_a_logged_retry_then_it_bridges(bridges):
    server = RedisProcess(free_port())
    bridge = start_bridge(bridges, server.url)
    try:
        bridge.wait_for_line(r"Redis (subscriber|command) connection .* is unreachable")
        server.start()
        bridge.wait_for_line(ACTIVE)
        redis = Redis(server.port)
        try:
            bridge.wait_for_line(r"Redis subscriber connection .* is up")
            redis("PUBLISH", "stream.score_updates", "2665")
            redis.wait_for_length(1)
        finally:
            redis.close()
        assert bridge.terminate() == 0
    finally:
        server.stop()
    assert "Traceback" not in bridge.log()


@pytest_twisted.ensureDeferred
async def test_the_scripts_on_redis_fence_appends_and_release_with_a_notice(redis_server,
                                                                           redis):
    connection = RedisConnection(parse_redis_url(redis_server.url), reactor=reactor,
                                 purpose="command")
    connection.startService()
    try:
        await within(connection.when_up())
        history = RedisHistory(connection, KEY, maxlen=100)
        assert await within(history.acquire("a", 10_000)) == (2, b"a")
        assert await within(history.acquire("a", 10_000)) == (1, b"a")
        assert await within(history.acquire("b", 10_000)) == (0, b"a")
        assert 9000 < redis("PTTL", lease_key(KEY)) <= 10_000
        assert await within(history.append("a", [(b"c1", b"p1"), (b"c2", b"p2")])) == 2
        assert await within(history.append("b", [(b"c3", b"p3")])) == -1
        assert await within(history.tail(64)) == [(b"c1", b"p1"), (b"c2", b"p2")]
        assert await within(history.release("b")) == 0
        listener = Redis(redis_server.port)
        try:
            listener("SUBSCRIBE", release_channel(KEY))
            assert await within(history.release("a")) == 1
            assert listener.next_reply() == [b"message", release_channel(KEY), b"a"]
        finally:
            listener.close()
        assert redis("EXISTS", lease_key(KEY)) == 0
        assert await within(history.append("a", [(b"c4", b"p4")])) == -1
        assert redis.entries() == [(b"c1", b"p1"), (b"c2", b"p2")]
        # Another writer's entry reads as nothing a bridge heard.
        redis("XADD", KEY, "*", "other", "field")
        assert (await within(history.tail(1))) == [(b"", b"")]
    finally:
        await connection.stopService()


def test_the_shipped_unit_does_not_restart_a_bridge_whose_settings_cannot_work(tmp_path):
    from test_systemd import exec_start, unit_value

    code = int(unit_value("emojistream-bridge.service", "RestartPreventExitStatus"))
    result = subprocess.run(exec_start("emojistream-bridge.service"), capture_output=True,
                            text=True, env={**repo_env(), "EMOJISTREAM_BRIDGE_LEASE": "-1"},
                            timeout=60, cwd=tmp_path)
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == code == CONFIG_ERROR_EXIT, out
    assert out == "twistd emojistream-bridge: EMOJISTREAM_BRIDGE_LEASE: '-1' must be a " \
                  "positive number"


def test_under_systemd_it_notifies_ready_watchdog_its_state_and_stopping(
        tmp_path, redis_server, bridges):
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(20)
    try:
        bridge = start_bridge(bridges, redis_server.url,
                              env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        messages = [listener.recv(4096).decode()]
        while "STATUS=active" not in messages[-1]:
            messages.append(listener.recv(4096).decode())
        assert any(m.startswith("READY=1") for m in messages)
        assert messages[-1] == "WATCHDOG=1\nSTATUS=active, 0 appended, 0 dropped to " \
                               "emojistream:events"
        bridge.proc.send_signal(signal.SIGTERM)
        while not messages[-1].startswith("STOPPING=1"):
            messages.append(listener.recv(4096).decode())
        assert bridge.proc.wait(20) == 0
    finally:
        listener.close()
