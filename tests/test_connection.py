"""KeptConnection (backoff, flapping, the prepare deadline) and the Redis heartbeat on
a Clock: ClientService driven as Twisted's own tests drive it, through an in-memory
endpoint whose connections are iosim pumps to a stand-in peer. No socket, no Redis,
no wall clock."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.test import iosim
from zope.interface import implementer

from emojistream.config import parse_redis_url
from emojistream.connection import MAX_DELAY, KeptConnection, backoff
from emojistream.redisconn import CommandProtocol, RedisConnection
from fakestreams import split_commands


def top(attempt: int) -> float:
    """The backoff with its jitter at the top: the longest delay for C{attempt}."""
    return backoff(attempt, rand=lambda: 1.0)


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects to whatever C{peer()} builds (a refusal if it returns None), over an
    iosim pump; the connection is reported on the next turn, as by a reactor."""

    def __init__(self, clock: Clock, peer: Callable[[], Protocol | None]) -> None:
        self.clock = clock
        self.peer = peer
        #: Clock times of the connection attempts.
        self.attempts: list[float] = []
        #: Clock times of the connections the peer accepted.
        self.accepted: list[float] = []
        self.pumps: list[iosim.IOPump] = []
        self.servers: list[Protocol] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self.attempts.append(self.clock.seconds())
        server = self.peer()
        if server is None:
            return fail(ConnectionRefusedError("refused by the test"))
        client = factory.buildProtocol(None)
        assert client is not None
        self.accepted.append(self.clock.seconds())
        self.servers.append(server)
        d: Deferred[IProtocol] = Deferred()

        def connected() -> None:
            self.pumps.append(iosim.connect(
                server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
                greet=False, clock=self.clock))
            d.callback(client)
            self.flush()

        self.clock.callLater(0, connected)
        return d

    def flush(self) -> None:
        """Move whatever is in flight, both ways, until nothing is."""
        moved = True
        while moved:
            moved = False
            for pump in list(self.pumps):
                if pump.flush(advanceClock=False):
                    moved = True

    def run(self, seconds: float) -> None:
        """Let C{seconds} of clock time pass, call by call, moving data after each."""
        end = self.clock.seconds() + seconds
        self.clock.advance(0)
        self.flush()
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls()]
            step = min([t for t in due if t <= end] or [end]) - self.clock.seconds()
            self.clock.advance(max(step, 0.0))
            self.flush()
            if self.clock.seconds() >= end and not [
                    t for t in (c.getTime() for c in self.clock.getDelayedCalls()) if t <= end]:
                return


class Hangup(Protocol):
    """A peer that accepts and closes at once."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class Quiet(Protocol):
    """A peer that accepts and never says a word."""


class FakeRedis(Protocol):
    """Just enough of Redis: AUTH against C{password}, SELECT, PING; answers nothing
    at all while C{wedged}."""

    wedged = False

    def __init__(self, password: str | None = None) -> None:
        self.password = password
        self.buffer = b""
        self.commands: list[list[bytes]] = []

    def dataReceived(self, data: bytes) -> None:
        commands, self.buffer = split_commands(self.buffer + data)
        for args in commands:
            self.commands.append(args)
            if not self.wedged:
                self.answer(args)

    def answer(self, args: list[bytes]) -> None:
        assert self.transport is not None
        name = args[0].upper()
        if name == b"AUTH":
            if args[-1].decode() == self.password:
                self.transport.write(b"+OK\r\n")
            else:
                self.transport.write(b"-WRONGPASS invalid username-password pair\r\n")
        elif name == b"PING":
            self.transport.write(b"+PONG\r\n")
        else:
            self.transport.write(b"+OK\r\n")


@pytest.fixture
def events() -> Any:
    captured: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(captured.append)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(captured.append)


def ours(events: list[dict[str, Any]], what: str = "") -> list[tuple[LogLevel, str]]:
    """Our own log lines (level, text) that mention C{what}."""
    from twisted.logger import formatEvent

    return [(e["log_level"], formatEvent(e)) for e in events
            if e.get("log_namespace", "").startswith("emojistream") and what in formatEvent(e)]


def kept(endpoint: MemoryEndpoint, **kwargs: Any) -> KeptConnection:
    return KeptConnection(endpoint, Protocol, clock=endpoint.clock, name="Test connection",
                          retry_policy=top, **kwargs)


def test_backoff_doubles_from_a_tenth_up_to_the_cap_jittered_in_the_upper_half() -> None:
    assert [top(n) for n in range(1, 9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert [backoff(n, rand=lambda: 0.0) for n in (1, 2, 7)] == [0.05, 0.1, 2.5]
    assert backoff(10_000, rand=lambda: 1.0) == MAX_DELAY


def test_an_unreachable_peer_is_retried_with_backoff_and_logged_once(events: Any) -> None:
    clock = Clock()
    endpoint = MemoryEndpoint(clock, lambda: None)
    attempts: list[int] = []

    def policy(attempt: int) -> float:
        attempts.append(attempt)
        return top(attempt)

    connection = KeptConnection(endpoint, Protocol, clock=clock, name="Test connection",
                                retry_policy=policy)
    connection.startService()
    endpoint.run(20)
    connection.stopService()
    assert attempts[:6] == [1, 2, 3, 4, 5, 6]
    gaps = [round(b - a, 6) for a, b in pairwise(endpoint.attempts)]
    assert gaps[:8] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert ours(events) == [(LogLevel.warn, "Test connection is unreachable: Connection "
                             "was refused by other side: refused by the test; retrying "
                             "every 5 s at most")]
    assert not [e for e in events if "log_failure" in e]


def test_a_peer_that_accepts_and_closes_is_retried_with_growing_backoff(events: Any) -> None:
    """What a carbon relay that hangs up on every connection gets: not ~40
    connections in 3 s, a growing gap, and four log lines then quiet."""
    clock = Clock()
    endpoint = MemoryEndpoint(clock, Hangup)
    connection = kept(endpoint)
    connection.startService()
    endpoint.run(3)
    gaps = [round(b - a, 6) for a, b in pairwise(endpoint.accepted)]
    # Each connection closed at once counts as a failure: the gap doubles each time.
    assert gaps == [0.1, 0.2, 0.4, 0.8], endpoint.accepted
    assert connection.state == "down" and connection.losses == 5
    lines = ours(events)
    assert [level for level, _ in lines] == [
        LogLevel.info, LogLevel.warn, LogLevel.info, LogLevel.warn], lines
    assert len([text for _, text in lines if "after it opened" in text]) == 1
    endpoint.run(60)
    assert len(ours(events)) == 4  # quiet while it keeps flapping
    connection.stopService()
    assert not [e for e in events if "log_failure" in e]


def test_a_connection_that_stays_up_ends_the_flapping_and_resets_the_backoff(
        events: Any) -> None:
    clock = Clock()
    hang_up = [True]
    endpoint = MemoryEndpoint(clock, lambda: Hangup() if hang_up[0] else Quiet())
    connection = kept(endpoint, prepare_timeout=1000)
    connection.startService()
    endpoint.run(3)
    hang_up[0] = False
    endpoint.run(MAX_DELAY + 0.01)
    assert connection.state == "up"
    endpoint.run(10)  # stable_after
    assert ours(events)[-1] == (LogLevel.info, "Test connection is up and stays up")
    # Lost now, it is news again, and the retry starts from the shortest delay.
    before = len(endpoint.attempts)
    hang_up[0] = True
    endpoint.pumps[-1].serverIO.loseConnection()
    endpoint.run(0.1 + 0.001)
    assert len(endpoint.attempts) == before + 1
    lines = ours(events)
    assert lines[lines.index((LogLevel.info, "Test connection is up and stays up")) + 1] \
        == (LogLevel.warn, "Test connection was lost; retrying every 5 s at most")
    connection.stopService()


def test_a_prepare_that_does_not_finish_in_time_closes_the_connection(events: Any) -> None:
    clock = Clock()
    answered = [False]
    endpoint = MemoryEndpoint(clock, Quiet)

    def prepare(protocol: Any) -> Deferred[None]:
        return succeed(None) if answered[0] else Deferred()

    connection = kept(endpoint, prepare=prepare, prepare_timeout=5)
    connection.startService()
    endpoint.run(4.9)
    assert connection.state == "connecting" and len(endpoint.accepted) == 1
    endpoint.run(0.2)
    assert connection.state == "down"
    assert endpoint.pumps[0].clientIO.disconnected  # aborted, not left hanging
    assert ours(events) == [(LogLevel.warn, "Test connection did not answer within 5 s; "
                             "retrying every 5 s at most")]
    endpoint.run(5)  # the next attempt meets the same silence: no new line
    assert len(endpoint.accepted) == 2 and len(ours(events)) == 1
    answered[0] = True
    endpoint.run(5.2)
    assert connection.state == "up" and connection.protocol is not None
    assert ours(events)[-1] == (LogLevel.info, "Test connection is up")
    connection.stopService()
    assert connection.state == "stopped"


def redis(endpoint: MemoryEndpoint, url: str = "redis://127.0.0.1:6379",
          **kwargs: Any) -> RedisConnection:
    return RedisConnection(parse_redis_url(url), reactor=endpoint.clock, purpose="subscriber",
                           build=CommandProtocol, retry_policy=top, endpoint=endpoint,
                           **kwargs)


def test_a_wrong_password_is_one_line_per_connection_and_no_traceback(events: Any) -> None:
    clock = Clock()
    endpoint = MemoryEndpoint(clock, lambda: FakeRedis(password="right"))
    connection = redis(endpoint, "redis://:wrong@127.0.0.1:6379")
    connection.startService()
    endpoint.run(15)
    connection.stopService()
    assert len(endpoint.accepted) >= 8  # retried all along, with backoff
    refused = ours(events, "was refused")
    assert len(refused) == 1 and "WRONGPASS" in refused[0][1]
    assert len(ours(events)) == 1
    # Not a line per retry either, from anyone (Twisted's ClientService is quieted).
    assert not [e for e in events if "Scheduling retry" in e.get("log_format", "")]
    assert len(events) <= 10, [e.get("log_format") for e in events]
    assert not [e for e in events if "log_failure" in e]
    assert connection.state == "stopped"


def test_the_password_and_database_are_sent_on_each_connection() -> None:
    clock = Clock()
    endpoint = MemoryEndpoint(clock, lambda: FakeRedis(password="s3cret"))
    connection = redis(endpoint, "redis://:s3cret@127.0.0.1:6379/3")
    connection.startService()
    endpoint.run(0.1)
    assert connection.state == "up"
    server: Any = endpoint.servers[0]
    assert server.commands[:2] == [[b"AUTH", b"s3cret"], [b"SELECT", b"3"]]
    connection.stopService()


def test_the_heartbeat_pings_a_silent_connection_and_keeps_a_live_one(events: Any) -> None:
    clock = Clock()
    endpoint = MemoryEndpoint(clock, FakeRedis)
    connection = redis(endpoint, heartbeat=3)
    connection.startService()
    endpoint.run(60)
    server: Any = endpoint.servers[0]
    pings = [c for c in server.commands if c == [b"PING"]]
    # Silent for 3 s: a PING; its answer is a read, so the next one 6 s later.
    assert 8 <= len(pings) <= 10, len(pings)
    assert connection.state == "up" and connection.losses == 0
    assert len(endpoint.accepted) == 1
    connection.stopService()


def test_a_connection_that_reads_is_not_pinged() -> None:
    clock = Clock()
    endpoint = MemoryEndpoint(clock, FakeRedis)
    connection = redis(endpoint, heartbeat=3)
    connection.startService()
    endpoint.run(0.1)
    server: Any = endpoint.servers[0]
    for _ in range(30):
        assert server.transport is not None
        server.transport.write(b"+chatter\r\n")  # something read every 2 s
        endpoint.run(2)
    assert [c for c in server.commands if c == [b"PING"]] == []
    connection.stopService()


def test_a_stuck_peer_is_detected_and_left_for_a_working_one(events: Any) -> None:
    """The path wedges (data no longer passes, new connections are accepted and never
    answered), then recovers: down within 3 heartbeats, up within 15 s of the
    recovery, and the whole outage is one warning that names the PING."""
    clock = Clock()
    wedged = [False]

    def peer() -> FakeRedis:
        server = FakeRedis()
        server.wedged = wedged[0]
        return server

    endpoint = MemoryEndpoint(clock, peer)
    # As the subscriber does, a command on each new connection (it subscribes).
    connection = redis(endpoint, heartbeat=3, prepare=lambda protocol: protocol.ping())
    connection.startService()
    endpoint.run(0.1)
    assert connection.state == "up"
    wedged[0] = True
    for server in endpoint.servers:
        server.wedged = True  # type: ignore[attr-defined]
    start = clock.seconds()
    down = connection.when_state("down")
    while not down.called:
        endpoint.run(0.1)
    assert clock.seconds() - start <= 3 * 3 + 0.1
    assert connection.losses == 1
    endpoint.run(6)  # reconnections meet the wedged peer and time out
    assert connection.state == "down"
    wedged[0] = False
    start = clock.seconds()
    up = connection.when_state("up")
    while not up.called:
        endpoint.run(0.1)
    assert clock.seconds() - start < 15
    warnings = [text for level, text in ours(events, "retrying")]
    assert len(warnings) == 1, warnings
    assert "subscriber" in warnings[0] and "PING" in warnings[0]
    assert not [e for e in events if "log_failure" in e]
    connection.stopService()
