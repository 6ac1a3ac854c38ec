"""Reports to the admin cluster (HSET in a real Redis) and to graphite (carbon lines
read by real TCP and UDP sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from conftest import running
from daemonproc import TwistdProcess
from emojistream.config import Settings, resolve
from emojistream.reporting import (
    ADMIN_INTERVAL,
    WITHDRAW_TIMEOUT,
    AdminReporter,
    carbon_lines,
)
from sseclient import within


@pytest_twisted.ensureDeferred
async def test_admin_report_hsets_the_status_json(redis_server, publisher):
    clock = Clock()
    clock.advance(1_800_000_000)
    env = {"REDIS_URL": redis_server.url + "/2", "ADMIN_REPORT": "true",
           "NODE_NAME": "web.1", "RACK_ENV": "production"}
    async with running(env, clock=clock) as (d, c):
        reporter = d.app.admin_reporter
        assert reporter is not None
        await c.stream("/subscribe/eps", headers={"User-Agent": "ua"})
        await within(d.app.admin_reporter._connection.when_up())
        clock.advance(ADMIN_INTERVAL)
        await within(reporter.last_report)
        await publisher.select(2)
        raw = await publisher.hget("admin_stream_status", "twisted-production-web.1")
    report = json.loads(raw)
    assert report["node"] == "twisted-production-web.1"
    assert report["status"] == "OK"
    assert report["reported_at"] == 1_800_000_000 + ADMIN_INTERVAL
    (conn,) = report["connections"]
    assert conn["request_path"] == "/subscribe/eps" and conn["user_agent"] == "ua"
    assert conn["age"] == ADMIN_INTERVAL
    assert set(report) >= {"node", "status", "reported_at", "connections"}


@pytest_twisted.ensureDeferred
async def test_a_daemon_stopped_cleanly_takes_its_reports_out_of_redis(
        redis_server, publisher):
    """SIGTERM: after the drain and before its Redis connection closes, the node
    deletes its entries from both hashes, so no cluster view lists it as stale."""
    proc = TwistdProcess("emojistream", "--listen", "tcp:0:interface=127.0.0.1",
                         "--admin-report", env={"REDIS_URL": redis_server.url,
                                                "NODE_NAME": "leaving"})
    try:
        proc.wait_for_line(r"admin status is in Redis as 'twisted-development-leaving'")
        for key in ("admin_stream_status", "admin_stream_summary"):
            assert await within(publisher.hexists(key, "twisted-development-leaving"))
        await within(publisher.hset("admin_stream_status", "other", "{}"))
    finally:
        code = proc.terminate()
    assert code == 0, proc.log()
    proc.wait_for_line(r"Took this node's admin status out of Redis")
    for key in ("admin_stream_status", "admin_stream_summary"):
        assert not await within(publisher.hexists(key, "twisted-development-leaving"))
    assert await within(publisher.hkeys("admin_stream_status")) == [b"other"]


class FakeRedis:
    """What the reporter uses of a txredisapi protocol; each command waits for the
    test to answer it."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, str, Any]] = []
        self.replies: list[Deferred[int]] = []

    def _command(self, name: str, key: str, arg: Any) -> Deferred[int]:
        self.commands.append((name, key, arg))
        self.replies.append(Deferred())
        return self.replies[-1]

    def hset(self, key: str, field: str, value: bytes) -> Deferred[int]:
        return self._command("HSET", key, field)

    def hdel(self, key: str, fields: list[str]) -> Deferred[int]:
        return self._command("HDEL", key, fields)

    def answer(self) -> None:
        while any(not d.called for d in self.replies):
            next(d for d in self.replies if not d.called).callback(1)


class FakeConnection:
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol


def test_withdrawing_waits_for_the_report_in_flight_then_deletes_both_entries():
    redis = FakeRedis()
    clock = Clock()
    reporter = AdminReporter(FakeConnection(redis), lambda: b"{}", "n1",
                             summary=lambda: b"{}", clock=clock)
    report = reporter.report()
    assert redis.commands == [("HSET", "admin_stream_status", "n1")]
    withdrawn: list[object] = []
    reporter.withdraw().addBoth(withdrawn.append)
    assert reporter.report() is None  # one report at a time
    assert not withdrawn and len(redis.commands) == 1  # its HSETs come first
    redis.replies[0].callback(1)
    assert redis.commands[1] == ("HSET", "admin_stream_summary", "n1")
    redis.replies[1].callback(1)
    assert report is not None
    assert redis.commands[2:] == [("HDEL", "admin_stream_status", ["n1"]),
                                  ("HDEL", "admin_stream_summary", ["n1"])]
    redis.answer()
    assert withdrawn == [None]
    assert reporter.report() is None and len(redis.commands) == 4  # no report after


def test_withdrawing_gives_up_on_a_silent_redis_and_skips_a_missing_one():
    redis = FakeRedis()
    clock = Clock()
    reporter = AdminReporter(FakeConnection(redis), lambda: b"{}", "n1", clock=clock)
    withdrawn: list[object] = []
    reporter.withdraw().addBoth(withdrawn.append)
    assert redis.commands == [("HDEL", "admin_stream_status", ["n1"])]
    clock.advance(WITHDRAW_TIMEOUT - 0.1)
    assert not withdrawn
    clock.advance(0.1)
    assert withdrawn == [None]  # logged, not failed: the stop goes on
    down = AdminReporter(FakeConnection(None), lambda: b"{}", "n2", clock=clock)
    down.withdraw().addBoth(withdrawn.append)
    assert withdrawn == [None, None]


def test_admin_report_defaults_follow_the_environment():
    assert resolve({"RACK_ENV": "production"}, {}).admin_report is True
    assert resolve({"RACK_ENV": "staging"}, {}).admin_report is True
    assert resolve({"RACK_ENV": "development"}, {}).admin_report is False
    assert resolve({"RACK_ENV": "production", "ADMIN_REPORT": "no"}, {}).admin_report is False
    assert resolve({}, {"admin_report": "true"}).admin_report is True


@pytest_twisted.ensureDeferred
async def test_admin_reports_skip_a_redis_outage_with_one_log_line(redis_server, publisher):
    clock = Clock()
    events: list[dict] = []
    env = {"REDIS_URL": redis_server.url, "ADMIN_REPORT": "1"}
    globalLogPublisher.addObserver(events.append)
    try:
        async with running(env, clock=clock) as (d, _c):
            reporter = d.app.admin_reporter
            connection = reporter._connection
            await within(connection.when_up())
            clock.advance(ADMIN_INTERVAL)
            await within(reporter.last_report)
            redis_server.stop()
            await within(connection.when_state("down"))
            for _ in range(5):
                clock.advance(ADMIN_INTERVAL)  # skipped: nothing raised, nothing queued
            assert reporter.sent == 1
            redis_server.start()
            await within(connection.when_state("up"))
            clock.advance(ADMIN_INTERVAL)
            await within(reporter.last_report)
            assert reporter.sent == 2
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import LogLevel

    admin = [e for e in events if "command connection" in str(e.get("what", ""))
             or "command connection" in str(e.get("message", ""))]
    # Up, one warning for the outage, up again: a line per change, none per skip.
    assert [e["log_level"] for e in admin] == [LogLevel.info, LogLevel.warn, LogLevel.info]
    assert not [e for e in events if "log_failure" in e]


class Lines:
    """Carbon lines as a stand-in carbon daemon receives them, with waits on them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._waiters: list[tuple[int, int, Deferred[None]]] = []

    def add(self, data: bytes) -> None:
        self.lines.extend(line for line in data.decode().split("\n") if line)
        for stamp, n, d in list(self._waiters):
            if len(self.at(stamp)) >= n and not d.called:
                d.callback(None)

    def at(self, stamp: int) -> dict[str, float]:
        """The metrics of the batch stamped C{stamp}: path -> value."""
        batch = {}
        for line in self.lines:
            path, value, when = line.split(" ")
            if int(when) == stamp:
                batch[path] = float(value)
        return batch

    def wait(self, stamp: int, n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append((stamp, n, d))
        self.add(b"")
        return within(d)


class CarbonServer(Protocol):
    """A stand-in carbon daemon on a real TCP socket."""

    def __init__(self, sink: Lines) -> None:
        self.sink = sink
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        complete, _, self.buffer = self.buffer.rpartition(b"\n")
        self.sink.add(complete + b"\n")


class CarbonDatagrams(DatagramProtocol):
    def __init__(self, sink: Lines) -> None:
        self.sink = sink

    def datagramReceived(self, data: bytes, addr) -> None:
        self.sink.add(data)


METRICS = 16
CARBON_INTERVAL = Settings().graphite_interval


@pytest.mark.parametrize("transport", ["tcp", "udp"])
@pytest_twisted.ensureDeferred
async def test_carbon_lines_reach_a_real_socket(transport, redis_server, publisher):
    sink = Lines()
    if transport == "tcp":
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: CarbonServer(sink)),
                                 interface="127.0.0.1")
    else:
        port = reactor.listenUDP(0, CarbonDatagrams(sink), interface="127.0.0.1")
    start = 1_700_000_000
    clock = Clock()
    clock.advance(start)
    env = {"REDIS_URL": redis_server.url, "NODE_NAME": "web.1", "RACK_ENV": "production",
           "GRAPHITE_URL": f"{transport}://127.0.0.1:{port.getHost().port}",
           "HOSTEDGRAPHITE_APIKEY": "k3y", "ADMIN_REPORT": "false"}
    try:
        async with running(env, clock=clock) as (d, c):
            if transport == "tcp":
                await within(d.app.carbon.when_up())
            _, eps1 = await c.stream("/subscribe/eps")
            await c.stream("/subscribe/eps")
            _, raw = await c.stream("/subscribe/raw")
            _, detail = await c.stream("/subscribe/details/2665")
            for emoji_id in ("2665", "2665", "1F602"):
                await publisher.publish("stream.score_updates", emoji_id)
            await publisher.publish("stream.tweet_updates.2665", "{}")
            await raw.wait_events(3)
            await detail.wait_events(1)
            clock.advance(1 / 60)  # one summary to both eps clients
            await eps1.wait_events(1)
            clock.advance(CARBON_INTERVAL - 1 / 60)
            await sink.wait(start + 10, METRICS)
            clock.advance(CARBON_INTERVAL)
            await sink.wait(start + 20, METRICS)
            if transport == "tcp":
                assert len(sink.at(start + 10)) == METRICS + 1
    finally:
        await port.stopListening()
    prefix = "k3y.emojistream.twisted-production-web_1."
    first = sink.at(start + 10)
    assert all(path.startswith(prefix) for path in first)
    # Over TCP, reports the relay did not take are counted too.
    first.pop(prefix + "carbon.dropped_reports", None)
    assert {path.removeprefix(prefix): v for path, v in first.items()} == {
        "stream.eps.clients": 2, "stream.raw.clients": 1, "stream.detail.clients": 1,
        "messages.received": 4, "messages.dropped": 0, "messages.oversized": 0,
        # 3 raw + 1 detail + 1 summary to each of 2 eps clients
        "messages.delivered": 6, "connections.closed": 0, "connections.dropped": 0,
        "messages.conflated": 0, "messages.discarded": 0, "redis.subscriber_losses": 0,
        "connections.refused_per_ip": 0, "connections.accept_pauses": 0,
        "connections.refused_at_limit": 0, "admin.status_refused": 0,
    }
    # The second period saw no traffic: counters report the change, not the total.
    second = {path.removeprefix(prefix): v for path, v in sink.at(start + 20).items()}
    assert second["messages.received"] == 0 and second["messages.delivered"] == 0
    assert second["stream.eps.clients"] == 2


def test_carbon_line_format():
    assert carbon_lines("a.b", {"x.y": 3, "z": 0.5}, 17) == b"a.b.x.y 3 17\na.b.z 0.5 17\n"


@pytest_twisted.ensureDeferred
async def test_carbon_tcp_connection_comes_back_after_the_server_restarts(redis_server):
    sink = Lines()
    servers: list[CarbonServer] = []

    def build() -> CarbonServer:
        servers.append(CarbonServer(sink))
        return servers[-1]

    port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
    number = port.getHost().port
    start = 1_700_000_000
    clock = Clock()
    clock.advance(start)
    env = {"REDIS_URL": redis_server.url, "GRAPHITE_URL": f"tcp://127.0.0.1:{number}"}
    try:
        async with running(env, clock=clock) as (d, _c):
            carbon = d.app.carbon
            await within(carbon.when_up())
            clock.advance(CARBON_INTERVAL)
            await sink.wait(start + 10, METRICS)
            # The carbon daemon goes away...
            await port.stopListening()
            for server in servers:
                server.transport.loseConnection()
            await within(carbon.when_state("down"))
            clock.advance(CARBON_INTERVAL)  # this report is skipped, not queued
            # ...and comes back on the same port: the connection is re-established.
            port = reactor.listenTCP(number, Factory.forProtocol(build), interface="127.0.0.1")
            await within(carbon.when_state("up"))
            clock.advance(CARBON_INTERVAL)
            await sink.wait(start + 30, METRICS)
    finally:
        await port.stopListening()
    assert sink.at(start + 20) == {}
    assert len(servers) == 2


def test_a_carbon_relay_that_stops_reading_costs_no_memory_and_does_not_hold_up_stop(
        redis_server):
    """A relay that accepts and never reads, 20 reports a second of 220 KB each: the
    daemon's memory stays flat and SIGTERM still exits within the drain + 2 s."""
    import socket
    import time

    from daemonproc import TwistdProcess

    relay = socket.socket()
    relay.bind(("127.0.0.1", 0))
    relay.listen(8)  # never accepted, never read
    try:
        proc = TwistdProcess(
            "emojistream", "--listen", "tcp:0:interface=127.0.0.1", "--redis",
            redis_server.url, "--graphite", f"tcp://127.0.0.1:{relay.getsockname()[1]}",
            "--graphite-interval", "0.05", "--graphite-prefix", "k" * 20_000,
            "--drain-sec", "1")
        try:
            proc.port()
            # The kernel's buffers take the first few MB; then the relay is full.
            proc.wait_for_line("is not reading; dropping reports")
            before = rss_kb(proc.proc.pid)
            # The window measured, not a wait for something: 200 more reports, 44 MB
            # that must not pile up.
            time.sleep(10)
            after = rss_kb(proc.proc.pid)
            stopping = time.monotonic()
        finally:
            code = proc.terminate()
        took = time.monotonic() - stopping
    finally:
        relay.close()
    assert code == 0
    assert after - before < 3 * 1024, (before, after)
    assert took < 1 + 2, took
    assert "is not reading; dropping reports" in proc.log()
    assert "Traceback" not in proc.log()


def rss_kb(pid: int) -> int:
    """Resident memory of process C{pid} in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
