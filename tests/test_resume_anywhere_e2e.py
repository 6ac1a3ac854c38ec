"""Issue 20 end to end ("How it is verified"), with every part a real process: one
redis-server (AOF on), one bridge (`twistd -n emojistream-bridge --kiosk-stream`),
three daemons with --source streams: nodes A and B behind the shipped nginx config,
node C with --workers 2 on its own port (its two workers share it, SO_REUSEPORT).

A feeder PUBLISHes 400 hits a second (a score and a detail update each, a kiosk
message every 25th); the bridge appends them to the stream. One client per path
(/details/<ID>, /details, /raw, /kiosk_interaction, /eps) reconnects 20 times with
Last-Event-ID, alternately through nginx (A or B, as nginx picks) and straight to C
(worker 1 or 2, as the kernel picks): every reconnection lands on another process
than the one before. Each connection is cut from the client side once it has had a
few events, and the client reconnects once the feeder has published more. What the
clients got is checked against the stream itself (XRANGE): every event once, in
order, nothing missing; /eps totals exact from the first summary's id on.

The same run with the stream readers' connections killed (CLIENT KILL TYPE normal)
and Redis restarted (DEBUG RESTART, AOF on); with node A restarted (SIGTERM, start
again); and a resume from an ID trimmed away (XTRIM MINID), which gets the gap event
with an id that a later resume goes on from, nothing twice.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, gatherResults
from twisted.internet.threads import deferToThread

from daemonproc import TwistdProcess
from emojistream.history import decode_entry, epoch_key
from redisproc import RedisProcess
from sseclient import Client, StreamReader, within
from ssespec import Event
from test_bridge import Redis
from test_nginx import NGINX, SHIPPED, Nginx

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not NGINX, reason="needs nginx")]

KEY = "emojistream:events"
SCORE = b"stream.score_updates"
DETAIL = b"stream.tweet_updates."
KIOSK = b"stream.interaction."
#: The emoji whose own detail stream a client follows: a quarter of all hits.
WATCHED = "2665"
OTHERS = ["1F602", "1F60D", "1F62D", "2764", "1F44D", "1F64F", "1F60A", "1F525",
          "1F614", "1F389", "1F60E", "1F64C"]
RECONNECTS = 20
#: Per path: new events a connection gets before the client cuts it.
PATHS = {
    f"/subscribe/details/{WATCHED}": 4,
    "/subscribe/details": 8,
    "/subscribe/raw": 8,
    "/subscribe/kiosk_interaction": 1,
    "/subscribe/eps": 3,
}
#: Hits the feeder publishes between a client's cut and its reconnection: what it
#: misses and must be given on resuming (about a tenth of a second's worth).
MISS = 40
#: Seconds a client waits at most for those before it reconnects all the same.
PAUSE = 0.3

ACTIVE = r"Bridge (\S+) is the active bridge: appending to "
READING = r"Reading emojistream:events .*(from its newest entry|on from entry)"
READ_ON = r"Reading emojistream:events on from entry \S+ \(epoch \w+\): nothing missed"
NOT_READ_ON = r"were trimmed before it read them|was replaced \(epoch"


def quiet_port() -> int:
    """A port nothing listens on, below the ephemeral range: no outgoing connection of
    this machine's (a Redis client of another test) takes it meanwhile, and a node
    restarted on it finds it free again."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def entry_key(event_id: str) -> tuple[int, int]:
    """The stream entry ID in an event ID (<epoch>-<ms>-<seq>), comparable."""
    _epoch, ms, seq = event_id.rsplit("-", 2)
    return int(ms), int(seq)


class Feeder:
    """Publishes C{per_second} hits from a thread, as emojitracker's feeder does:
    the score, then the detail update, and every 25th hit a kiosk message. Survives
    its connection being killed or Redis restarting (reconnects and goes on)."""

    def __init__(self, port: int, per_second: int = 400) -> None:
        self._port = port
        #: Hits published, as the reactor has heard (L{published}), and as sent.
        self.hits = self.sent = 0
        #: The last message sent: (channel, payload).
        self.last: tuple[bytes, bytes] | None = None
        self.errors = 0
        self._per_tick = 4
        self._interval = self._per_tick / per_second
        self._stop = threading.Event()
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        redis: Redis | None = None
        n = 0
        due = time.monotonic()
        while not self._stop.is_set():
            commands: list[tuple[Any, ...]] = []
            for i in range(n, n + self._per_tick):
                emoji = WATCHED if i % 4 == 0 else OTHERS[i * 7 % len(OTHERS)]
                commands.append(("PUBLISH", SCORE, emoji))
                commands.append(("PUBLISH", DETAIL + emoji.encode(), b'{"n":%d}' % i))
                if i % 25 == 0:
                    commands.append(("PUBLISH", KIOSK + b"kiosk-1", b'{"k":%d}' % i))
            try:
                if redis is None:
                    redis = Redis(self._port)
                redis.pipeline(*commands)
            except (OSError, AssertionError):
                # Killed (CLIENT KILL) or Redis restarting: the feeder reconnects.
                self.errors += 1
                if redis is not None:
                    redis.close()
                redis = None
                self._stop.wait(0.02)
                due = time.monotonic()
                continue
            n += self._per_tick
            self.sent = n
            self.last = commands[-1][1:]
            reactor.callFromThread(self._published, n)
            due = max(due + self._interval, time.monotonic() - 0.1)
            self._stop.wait(max(0.0, due - time.monotonic()))
        if redis is not None:
            redis.close()

    def _published(self, n: int) -> None:
        self.hits = n
        ready = [d for at, d in self._waiters if at <= n]
        self._waiters = [(at, d) for at, d in self._waiters if at > n]
        for d in ready:
            d.callback(None)

    def published(self, more: int) -> Deferred[None]:
        """Fires once C{more} hits more than now are published."""
        entry: tuple[int, Deferred[None]] = (self.hits + more, Deferred(
            lambda d: self._waiters.remove(entry)))
        self._waiters.append(entry)
        return within(entry[1], 30)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Progress:
    """Connections made by all clients together, with waits on their number."""

    def __init__(self) -> None:
        self.count = 0
        self._waiters: list[tuple[int, Deferred[None]]] = []
        #: While set, the clients cut no connection (ends by the server still count).
        self.hold = False
        self.followers: list[Follower] = []

    def release(self) -> None:
        """Clients cut their connections again."""
        self.hold = False
        for follower in self.followers:
            follower.check()

    def add(self) -> None:
        self.count += 1
        ready = [d for at, d in self._waiters if at <= self.count]
        self._waiters = [(at, d) for at, d in self._waiters if at > self.count]
        for d in ready:
            d.callback(None)

    def reached(self, n: int) -> Deferred[None]:
        """Fires once C{n} connections were made."""
        d: Deferred[None] = Deferred()
        if self.count >= n:
            d.callback(None)
        else:
            self._waiters.append((n, d))
        return within(d, 60)


class Follower:
    """One client of C{path}: connects, takes C{cut_after} new events, cuts the
    connection, waits for the feeder to publish L{MISS} more hits, and reconnects with
    Last-Event-ID to the other of C{targets}; C{reconnects} times, then it stays on
    until L{finish} says what the last event must be. A connection the server ends
    (a node stopping) or that fails is reconnected at once (to the other target)."""

    def __init__(self, path: str, targets: list[Client], first: int, cut_after: int,
                 feeder: Feeder, progress: Progress, reconnects: int = RECONNECTS) -> None:
        self.path = path
        self.eps = path.endswith("/eps")
        self._targets = targets
        self._turn = first
        self._cut_after = cut_after
        self._feeder = feeder
        self._progress = progress
        self._reconnects = reconnects
        #: Every event received, in order, over all connections.
        self.events: list[Event] = []
        #: Connections opened (200), cut by the client, ended by the server, refused.
        self.opened = 0
        self.cut = 0
        self.ended_by_server = 0
        self.refused = 0
        #: X-Sse-Gap headers seen.
        self.gap_headers: list[str] = []
        #: Connections opened per target (0: nginx, 1: node C).
        self.per_target = [0, 0]
        self.reconnected: Deferred[None] = Deferred()
        self._last_key: tuple[int, int] | None = None
        self._reader: StreamReader | None = None

    def _done(self, reader: StreamReader) -> bool:
        if self._last_key is None or not reader.events:
            return False
        return entry_key(reader.events[-1].last_event_id) >= self._last_key

    def _until_final(self, reader: StreamReader) -> bool:
        return reader.is_closed or self._done(reader)

    def _until_cut(self, reader: StreamReader) -> bool:
        return reader.is_closed or (len(reader.events) >= self._cut_after
                                    and not self._progress.hold)

    def finish(self, last_key: tuple[int, int]) -> None:
        """Stay on until an event with (at least) this entry ID has arrived."""
        self._last_key = last_key
        self.check()

    def check(self) -> None:
        """Something changed that the open connection's wait depends on."""
        if self._reader is not None:
            self._reader._check()

    @property
    def connected(self) -> bool:
        return self._reader is not None

    @property
    def target(self) -> int:
        """The target of the open connection (0: nginx, 1: node C)."""
        return 1 - self._turn

    async def run(self) -> None:
        while True:
            client = self._targets[self._turn]
            target = self._turn
            self._turn = 1 - self._turn
            last = self.events[-1].last_event_id if self.events else None
            headers = {"Last-Event-ID": last} if last else None
            try:
                response, reader = await client.stream(self.path, headers)
            except Exception:
                self.refused += 1
                continue
            if response.code != 200:
                self.refused += 1
                reader.close()
                continue
            self.opened += 1
            self.per_target[target] += 1
            self._progress.add()
            gap = response.headers.getRawHeaders(b"x-sse-gap")
            if gap:
                self.gap_headers += [g.decode() for g in gap]
            self._reader = reader
            final = self.opened > self._reconnects
            if final and not self.reconnected.called:
                self.reconnected.callback(None)
            await reader.wait_for(self._until_final if final else self._until_cut, 60)
            self._reader = None
            self.events += reader.events
            if reader.is_closed:
                self.ended_by_server += 1
                if final and self._done(reader):
                    return
                continue
            reader.close()
            await reader.wait_closed()
            if final:
                return
            self.cut += 1
            # Until the feeder has published more, or (Redis down: it cannot) a
            # moment has passed: a client reconnects whatever Redis is doing.
            published = self._feeder.published(MISS)
            await DeferredList([published, sleep(PAUSE)], fireOnOneCallback=True,
                               consumeErrors=True)
            published.cancel()


def stream_entries(port: int) -> list[tuple[str, bytes, bytes]]:
    """(entry ID, channel, payload) of every entry of the stream, oldest first."""
    redis = Redis(port)
    try:
        raw = redis("XRANGE", KEY, "-", "+")
    finally:
        redis.close()
    return [(i.decode(), *decode_entry(fields)) for i, fields in raw]


def expected_events(path: str, entries: list[tuple[str, bytes, bytes]], epoch: str
                    ) -> list[tuple[str, str, str]]:
    """(id, event type, data) of every event of C{path} in the stream."""
    def wanted(channel: bytes) -> bool:
        if path.endswith("/raw"):
            return channel == SCORE
        if path.endswith("/details"):
            return channel.startswith(DETAIL)
        if path.endswith(f"/details/{WATCHED}"):
            return channel == DETAIL + WATCHED.encode()
        return channel.startswith(KIOSK)

    return [(f"{epoch}-{i}", "message" if c == SCORE else c.decode(), p.decode())
            for i, c, p in entries if wanted(c)]


def check_events(follower: Follower, entries: list[tuple[str, bytes, bytes]], epoch: str
                 ) -> int:
    """Every event of the follower's path in the stream, from its first on, exactly
    once and in order, up to the stream's last; returns how many."""
    got = [(e.last_event_id, e.type, e.data) for e in follower.events]
    assert not [g for g in got if g[1] == "gap"], (follower.path, follower.gap_headers)
    expected = expected_events(follower.path, entries, epoch)
    ids = [e[0] for e in expected]
    assert got and got[0][0] in ids, (follower.path, got[:3])
    start = ids.index(got[0][0])
    if got != expected[start:]:
        seen = Counter(g[0] for g in got)
        twice = [i for i, n in seen.items() if n > 1]
        missing = [i for i in ids[start:] if i not in seen]
        raise AssertionError(f"{follower.path}: {len(got)} events, {len(expected) - start} "
                             f"expected; twice: {twice[:5]}, missing: {missing[:5]}")
    return len(got)


def check_eps(follower: Follower, entries: list[tuple[str, bytes, bytes]], epoch: str
              ) -> int:
    """The summaries' ids rise, and the hits they count after the first are exactly
    the stream's score entries after the first's id up to the last's; returns the
    hits counted."""
    summaries = [(entry_key(e.last_event_id), json.loads(e.data)) for e in follower.events
                 if e.type == "message"]
    assert len(summaries) == len(follower.events), (follower.gap_headers, follower.events)
    keys = [k for k, _ in summaries]
    assert keys == sorted(set(keys)), "summary ids do not rise"
    assert all(e.last_event_id.startswith(epoch + "-") for e in follower.events)
    first, last = keys[0], keys[-1]
    expected: Counter[str] = Counter()
    for i, channel, payload in entries:
        if channel == SCORE and first < entry_key(f"{epoch}-{i}") <= last:
            expected[payload.decode()] += 1
    got: Counter[str] = Counter()
    for _, counts in summaries[1:]:
        got.update(counts)
    assert got == expected, {k: (got[k], expected[k]) for k in got.keys() | expected.keys()
                             if got[k] != expected[k]}
    return sum(expected.values())


class Cluster:
    """Redis, the bridge, nodes A and B behind nginx, node C with two workers."""

    def __init__(self, tmp: Path) -> None:
        self.redis = RedisProcess(extra_args=("--appendonly", "yes"))
        self.procs: dict[str, TwistdProcess] = {}
        self.ports = {name: quiet_port() for name in "abc"}
        self.nginx = Nginx(tmp, SHIPPED.read_text())
        self.nginx.port = quiet_port()
        self.children: set[int] = set()

    def node_args(self, name: str) -> list[str]:
        args = ["emojistream", "--listen", f"tcp:{self.ports[name]}:interface=127.0.0.1",
                "--redis", self.redis.url, "--node", name, "--source", "streams",
                "--raw-stream", "--kiosk-interaction-stream", "--trust-proxy",
                "--drain-sec", "1"]
        if name == "c":
            # Its workers keep few events in memory (8 KB: some 30 events in all):
            # their resumes read the stream. (Not --replay-events: that bounds what one
            # resume may bring, from memory or the stream alike.)
            args += ["--workers", "2", "--replay-bytes", "8000"]
        return args

    def start_node(self, name: str) -> TwistdProcess:
        self.procs[name] = proc = TwistdProcess(*self.node_args(name))
        return proc

    def wait_node(self, name: str) -> None:
        proc = self.procs[name]
        proc.wait_for_lines(READING, 2 if name == "c" else 1, timeout=60)
        proc.wait_for_lines(r"Serving HTTP on", 2 if name == "c" else 1, timeout=60)
        if name == "c":
            self.children.update(proc.children())

    def start(self) -> None:
        self.redis.start()
        self.procs["bridge"] = bridge = TwistdProcess(
            "emojistream-bridge", "--redis", self.redis.url, "--kiosk-stream")
        bridge.wait_for_line(ACTIVE)
        bridge.wait_for_line(r"Redis subscriber connection .* is up")
        redis = Redis(self.redis.port)
        try:
            redis("PUBLISH", SCORE, WATCHED)  # the stream exists before the nodes start
            redis.wait_for_length(1)
            self.epoch = redis("GET", epoch_key(KEY)).decode()
        finally:
            redis.close()
        for name in "abc":
            self.start_node(name)
        for name in "abc":
            self.wait_node(name)
        self.nginx.start([self.ports["a"], self.ports["b"]])

    def stop(self) -> None:
        """Everything ended, whatever state the test left it in."""
        self.nginx.stop()
        for proc in self.procs.values():
            with suppress(Exception):
                proc.terminate(timeout=15)
        for pid in self.children:
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.redis.stop()

    def redis_call(self, *args: Any) -> Any:
        redis = Redis(self.redis.port)
        try:
            return redis(*args)
        finally:
            redis.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("nginx"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


async def under_load(cluster: Cluster,
                     meanwhile: Callable[[Progress, Feeder], Any] | None = None
                     ) -> tuple[list[Follower], list[tuple[str, bytes, bytes]], float]:
    """The followers' run under the feeder's load (and C{meanwhile} during it, given
    the progress): their events checked against the stream; returns the followers,
    the stream's entries and the seconds the run took."""
    started = time.monotonic()
    feeder = Feeder(cluster.redis.port)
    progress = Progress()
    clients = [Client(f"http://127.0.0.1:{cluster.nginx.port}"),
               Client(f"http://127.0.0.1:{cluster.ports['c']}")]
    followers = [Follower(path, clients, i % 2, cut, feeder, progress)
                 for i, (path, cut) in enumerate(PATHS.items())]
    progress.followers = followers
    runs = [ensureDeferred(f.run()) for f in followers]
    try:
        if meanwhile is not None:
            await meanwhile(progress, feeder)
        await within(gatherResults([f.reconnected for f in followers],
                                   consumeErrors=True), 120)
        feeder.stop()
        entries = await deferToThread(wait_until_final, cluster, feeder)
        last_of = {f.path: last_key(f, entries, cluster.epoch) for f in followers}
        for f in followers:
            f.finish(last_of[f.path])
        await within(gatherResults(runs, consumeErrors=True), 60)
    finally:
        feeder.stop()
        for client in clients:
            await client.close()
        for run in runs:
            run.cancel()
            run.addErrback(lambda failure: None)  # ended by the cancel: not news
    return followers, entries, time.monotonic() - started


def wait_until_final(cluster: Cluster, feeder: Feeder, timeout: float = 30
                     ) -> list[tuple[str, bytes, bytes]]:
    """The stream once the bridge has appended the feeder's last message."""
    last = feeder.last  # the feeder has stopped: the last it sent
    deadline = time.monotonic() + timeout
    redis = Redis(cluster.redis.port)
    try:
        while True:
            newest = redis("XREVRANGE", KEY, "+", "-", "COUNT", 1)
            if newest and decode_entry(newest[0][1]) == last:
                break
            assert time.monotonic() < deadline, (
                f"the feeder's last hit {last!r} never reached the stream; newest "
                f"{redis('XREVRANGE', KEY, '+', '-', 'COUNT', 3)}; the bridge's log:\n"
                + "\n".join(cluster.procs["bridge"].lines[-30:]))
            time.sleep(0.05)
    finally:
        redis.close()
    return stream_entries(cluster.redis.port)


def last_key(follower: Follower, entries: list[tuple[str, bytes, bytes]], epoch: str
             ) -> tuple[int, int]:
    """The entry the follower's last event must reach: its path's last in the stream
    (/eps: the last score entry)."""
    if follower.eps:
        return max(entry_key(f"{epoch}-{i}") for i, c, _ in entries if c == SCORE)
    return entry_key(expected_events(follower.path, entries, epoch)[-1][0])


def verify(followers: list[Follower], entries: list[tuple[str, bytes, bytes]], epoch: str
           ) -> dict[str, int]:
    """Each follower's events checked; events (or /eps hits) checked per path."""
    checked = {}
    for f in followers:
        # Reconnections: cut by the client, or after the server ended the connection.
        assert f.cut + f.ended_by_server >= RECONNECTS, (f.path, f.cut)
        assert f.gap_headers == [], (f.path, f.gap_headers)
        checked[f.path] = (check_eps if f.eps else check_events)(f, entries, epoch)
    return checked


def report(name: str, followers: list[Follower], checked: dict[str, int], took: float
           ) -> None:
    print(f"\n{name}: {took:.1f} s")
    for f in followers:
        print(f"  {f.path}: {checked[f.path]} {'hits' if f.eps else 'events'} checked, "
              f"{f.opened} connections (nginx {f.per_target[0]}, node C "
              f"{f.per_target[1]}), {f.cut} cut, {f.ended_by_server} ended by the "
              f"server, {f.refused} refused")


@pytest_twisted.ensureDeferred
async def test_every_event_once_in_order_on_every_path_across_20_reconnects(cluster):
    followers, entries, took = await under_load(cluster)
    checked = verify(followers, entries, cluster.epoch)
    report("reconnects", followers, checked, took)
    assert all(f.ended_by_server == 0 and f.refused == 0 for f in followers)


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def status(port: int) -> dict[str, Any]:
    client = Client(f"http://127.0.0.1:{port}")
    try:
        _, body = await client.text("GET", "/admin/status.json")
    finally:
        await client.close()
    return json.loads(body)  # type: ignore[no-any-return]


def count_lines(proc: TwistdProcess, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(bool(regex.search(line)) for line in list(proc.lines))


def wait_redis(port: int, timeout: float = 30) -> None:
    """Until Redis answers PING (after a restart: once it has loaded its AOF)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            redis = Redis(port)
            try:
                if redis("PING") == b"PONG":
                    return
            finally:
                redis.close()
        except Exception:
            pass
        assert time.monotonic() < deadline, "Redis did not come back"
        time.sleep(0.05)


async def read_on_everywhere(cluster: Cluster, before: dict[str, int]) -> None:
    """Until every node (each worker of C) has said it reads on from its last entry
    since C{before} was counted."""
    for name in "abc":
        proc, more = cluster.procs[name], 2 if name == "c" else 1
        await deferToThread(proc.wait_for_lines, READ_ON, before[name] + more, 30)


@pytest_twisted.ensureDeferred
async def test_client_kill_and_a_redis_restart_under_load_lose_and_repeat_nothing(cluster):
    total = len(PATHS) * (RECONNECTS + 1)
    done: list[str] = []

    async def faults(progress: Progress, feeder: Feeder) -> None:
        await progress.reached(total // 3)
        before = {n: count_lines(cluster.procs[n], READ_ON) for n in "abc"}
        killed = cluster.redis_call("CLIENT", "KILL", "TYPE", "normal")
        # Five stream readers (A, B, C's two workers... and its parent's none), their
        # command connections, the bridge's, the feeder's.
        assert killed >= 4
        await read_on_everywhere(cluster, before)
        done.append(f"CLIENT KILL TYPE normal: {killed} connections")
        await progress.reached(2 * total // 3)
        before = {n: count_lines(cluster.procs[n], READ_ON) for n in "abc"}
        redis = Redis(cluster.redis.port)
        try:
            redis.pipeline(("DEBUG", "RESTART"))
        except (OSError, AssertionError):
            pass  # Redis closed the connection as it restarted: the expected answer
        finally:
            redis.close()
        await deferToThread(wait_redis, cluster.redis.port)
        await read_on_everywhere(cluster, before)
        done.append("DEBUG RESTART")

    followers, entries, took = await under_load(cluster, faults)
    checked = verify(followers, entries, cluster.epoch)
    report("client kill + Redis restart: " + ", ".join(done), followers, checked, took)
    assert len(done) == 2
    # The stream survived the restart (AOF): the same epoch, its entries still there.
    assert cluster.redis_call("GET", epoch_key(KEY)).decode() == cluster.epoch
    for name in "abc":
        assert not [line for line in cluster.procs[name].lines
                    if re.search(NOT_READ_ON, line)], name


@pytest_twisted.ensureDeferred
async def test_a_resume_while_redis_is_stopped_is_filled_once_it_is_started_again(
        cluster):
    """Redis stopped (SIGTERM: it writes its AOF) and started again in the same
    directory: a client that resumes meanwhile, from an ID node C no longer holds in
    memory, gets what it missed once Redis is back, not a gap."""
    feeder = Feeder(cluster.redis.port)
    direct = Client(f"http://127.0.0.1:{cluster.ports['c']}")
    try:
        _, first = await direct.stream("/subscribe/raw")
        await first.wait_events(5)
        first.close()
        await first.wait_closed()
        await feeder.published(100)  # well past the 8 KB of events C keeps
        feeder.stop()
        before = {n: count_lines(cluster.procs[n], READ_ON) for n in "abc"}
        await deferToThread(cluster.redis.stop, True)
        _, resumed = await direct.stream(
            "/subscribe/raw", {"Last-Event-ID": first.events[-1].last_event_id})
        await deferToThread(cluster.redis.start)
        await read_on_everywhere(cluster, before)
        entries = stream_entries(cluster.redis.port)
        expected = [e for e in expected_events("/subscribe/raw", entries, cluster.epoch)
                    if entry_key(e[0]) > entry_key(first.events[-1].last_event_id)]
        assert len(expected) >= 100
        await resumed.wait_for(lambda r: r.events and (
            r.events[-1].type == "gap" or entry_key(r.events[-1].last_event_id)
            >= entry_key(expected[-1][0])), 30)
        assert [(e.last_event_id, e.type, e.data) for e in resumed.events] == expected
        print(f"\nresume while Redis was stopped: {len(expected)} events, once each")
    finally:
        feeder.stop()
        await direct.close()


@pytest_twisted.ensureDeferred
async def test_a_node_restarted_under_load_its_clients_resume_and_lose_nothing(cluster):
    total = len(PATHS) * (RECONNECTS + 1)
    restarted: list[str] = []

    async def restart(progress: Progress, feeder: Feeder) -> None:
        await progress.reached(total // 2)
        # Clients stay where they are now, so that the node stopped has some.
        progress.hold = True
        for _ in range(600):
            if all(f.connected for f in progress.followers):
                break
            await sleep(0.05)
        # The node behind nginx with the most of them (status is up to a second
        # old: until A's and B's add up to the clients on nginx), else C.
        on_nginx = sum(f.target == 0 for f in progress.followers)
        counts = {"a": 0, "b": 0}
        for _ in range(100):
            if sum(counts.values()) == on_nginx:
                break
            for name in "ab":
                counts[name] = len((await status(cluster.ports[name]))["connections"])
            await sleep(0.1)
        assert sum(counts.values()) == on_nginx, (counts, on_nginx)
        name = max(counts, key=lambda n: counts[n]) if on_nginx else "c"
        old = cluster.procs[name]
        code = await deferToThread(old.terminate)
        assert code == 0, old.log()
        cluster.start_node(name)
        await deferToThread(cluster.wait_node, name)
        assert count_lines(cluster.procs[name], r"from its newest entry") == (
            2 if name == "c" else 1)
        restarted.append(f"node {name.upper()} with {counts.get(name, 'all')} streams")
        progress.release()

    followers, entries, took = await under_load(cluster, restart)
    checked = verify(followers, entries, cluster.epoch)
    report("node restart: " + ", ".join(restarted), followers, checked, took)
    assert restarted
    # The stopped node's clients were ended by its drain, and resumed.
    assert sum(f.ended_by_server for f in followers) >= 1


@pytest_twisted.ensureDeferred
async def test_a_resume_from_a_trimmed_id_gets_the_gap_and_goes_on_from_its_id(cluster):
    feeder = Feeder(cluster.redis.port)
    direct = Client(f"http://127.0.0.1:{cluster.ports['c']}")
    proxied = Client(f"http://127.0.0.1:{cluster.nginx.port}")
    try:
        _, first = await direct.stream("/subscribe/raw")
        await first.wait_events(5)
        first.close()
        await first.wait_closed()
        old, kept = first.events[0].last_event_id, first.events[4].last_event_id
        # Well past the 8 KB of events node C keeps in memory.
        await feeder.published(200)
        await all_read_past(cluster, entry_key(kept))
        trimmed = cluster.redis_call("XTRIM", KEY, "MINID", "{}-{}".format(*entry_key(kept)))
        assert trimmed >= 4
        # A client that last saw the trimmed entry resumes on C: the gap event.
        _, gapped = await direct.stream("/subscribe/raw", {"Last-Event-ID": old})
        await gapped.wait_events(6)
        gapped.close()
        await gapped.wait_closed()
        gap = gapped.events[0]
        assert (gap.type, json.loads(gap.data)) == ("gap", {"reason": "expired"})
        assert entry_key(gap.last_event_id) > entry_key(kept)
        after_gap = gapped.events[1:]
        # It goes on from the gap's id (through nginx, on A or B) ...
        _, from_gap = await proxied.stream("/subscribe/raw",
                                           {"Last-Event-ID": gap.last_event_id})
        # ... and from the last event it had after the gap.
        _, going_on = await proxied.stream(
            "/subscribe/raw", {"Last-Event-ID": gapped.events[-1].last_event_id})
        await feeder.published(MISS)
        feeder.stop()
        entries = await deferToThread(wait_until_final, cluster, feeder)
        expected = [e for e in expected_events("/subscribe/raw", entries, cluster.epoch)
                    if entry_key(e[0]) > entry_key(gap.last_event_id)]
        last = entry_key(expected[-1][0])
        for reader in (from_gap, going_on):
            await reader.wait_for(lambda r: bool(r.events) and entry_key(
                r.events[-1].last_event_id) >= last, 30)
        as_got = [(e.last_event_id, e.type, e.data) for e in
                  after_gap + going_on.events]
        assert as_got == expected, "after the gap: not each event once, in order"
        assert [(e.last_event_id, e.type, e.data) for e in from_gap.events] == expected
        print(f"\ntrimmed: {trimmed} entries; gap id {gap.last_event_id}; "
              f"{len(expected)} events after it checked on two resumes")
    finally:
        feeder.stop()
        await direct.close()
        await proxied.close()


async def all_read_past(cluster: Cluster, key: tuple[int, int]) -> None:
    """Until every node (each of C's workers) has read past entry C{key}: trimming up
    to it then takes nothing any node has yet to read."""
    wanted = {"-a", "-b", "-c-1", "-c-2"}  # node names end with these
    for _ in range(150):
        for port in cluster.ports.values():
            doc = await status(port)
            position = doc["stream"]["position"]
            if position and tuple(map(int, position.split("-"))) >= key:
                wanted = {w for w in wanted if not doc["node"].endswith(w)}
        if not wanted:
            return
        await sleep(0.1)
    raise AssertionError(f"{wanted} did not read past {key}")
