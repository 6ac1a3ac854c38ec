"""The bridge: appends what a PUBLISHing feeder sends to the shared history stream.

Every bridge subscribes to the feeder's channels and keeps what it heard lately (about
two leases' worth). One of them, the holder of the lease in Redis
(L{emojistream.history.lease_key}), appends; the others stand by. The lease is taken
with C{SET NX PX}, renewed every third of its length while it still names this bridge,
and released on stop (compare and delete, then a notice on the release channel, so a
standby takes over at once rather than when the lease runs out). Every append is
fenced by the lease inside Redis (L{emojistream.history.APPEND_SCRIPT}): a bridge that
stalled past its lease appends nothing after another took over.

Taking over (and after an append whose outcome is unknown, its connection lost): the
new holder reads the stream's newest entries and appends only what follows them in
what it heard (L{emojistream.history.align}). Pub/sub delivers to every subscriber of
one Redis in one order, so the stream is a run of what any bridge heard.

What is promised, and the residual risks:

- Nothing is appended twice or out of order while one bridge holds the lease.
- A takeover appends exactly the messages the old holder had not, if the stream's
  newest entry is among what the new holder heard (two leases' worth) and the run of
  the newest L{TAIL_ENTRIES} entries was not heard twice. Should the same run recur
  (say the same score IDs in the same order 64 times over, with no detail update
  between: real traffic does not do that, a test that publishes one payload in a
  loop does), the messages between the two runs are taken for appended: lost, never
  duplicated.
- A new holder that cannot find the stream's newest entry in what it heard within a
  third of a lease (it started after the old holder's last append, or its own
  subscription broke) appends everything it still holds: the messages nobody heard
  are a gap. If it was only behind by more than that, or heard fewer than
  L{emojistream.history.ALIGN_LEAST} of the stream's newest entries (it subscribed
  just before the old holder's last appends), the overlap is appended twice.
- A bridge whose subscription breaks forgets what it heard (it cannot tell what it
  missed); the holder also gives the lease up, so a standby that heard everything
  takes over.
- When Redis takes appends slower than they come, at most C{max_pending} wait; the
  rest are dropped, counted, and logged once per L{DROP_LOG_PERIOD}.

All bridges of one stream must subscribe alike (all with C{--kiosk-stream} or none).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, Protocol

import txredisapi
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from emojistream.config import RedisAddress
from emojistream.history import (
    ACQUIRE_SCRIPT,
    APPEND_BATCH,
    APPEND_SCRIPT,
    RELEASE_SCRIPT,
    align,
    append_call,
    decode_entry,
    lease_key,
    release_channel,
    sha1,
)
from emojistream.redisconn import RedisConnection, SubscriberProtocol

#: The lease's length in seconds unless told otherwise: a standby takes over within
#: about this long after the active bridge dies without a word.
DEFAULT_LEASE = 5.0
#: The shortest lease: renewals go every third of it, and a lease shorter than a few
#: round trips and a garbage collection would change hands for nothing.
MIN_LEASE = 1.0
#: Leases' worth of messages a bridge keeps of what it heard, to align with at a
#: takeover: the old holder's last append happened at most a lease and a renewal
#: interval before the takeover.
HEARD_LEASES = 2.0
#: Messages kept of what was heard at most, whatever the lease (at 800 messages a
#: second, two 5-s leases hold 8,000).
MAX_HEARD = 200_000
#: Messages heard and not yet appended at most; more are dropped (and counted).
MAX_PENDING = 100_000
#: Newest entries read at a takeover to find where the stream ends in what was heard.
TAIL_ENTRIES = 64
#: Seconds between two log lines about dropped messages at most.
DROP_LOG_PERIOD = 10.0
#: Seconds a stopping bridge waits for its last appends before it gives the lease up.
STOP_FLUSH = 5.0


class State(StrEnum):
    """What a bridge is doing, as status and metrics name it."""

    ACTIVE = "active"  # holds the lease, appends
    STANDBY = "standby"  # another bridge holds the lease
    DOWN = "down"  # a Redis connection is down (or not yet up): cannot append


def bridge_id() -> str:
    """A bridge's id in the lease: host, process and a random part (unique per start)."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


class NotConnected(Exception):
    """The command connection is down: nothing was sent."""


class History(Protocol):
    """What the bridge asks of Redis (L{RedisHistory}; an in-memory one in tests)."""

    @property
    def up(self) -> bool:
        """Whether commands can be sent now."""

    def acquire(self, holder: str, lease_ms: int) -> Deferred[tuple[int, bytes]]:
        """Take or renew the lease: (2 taken, 1 renewed or 0 held by another; holder)."""

    def release(self, holder: str) -> Deferred[int]:
        """Give the lease up if C{holder} has it (1), and tell the standbys."""

    def append(self, holder: str, messages: Sequence[tuple[bytes, bytes]]
               ) -> Deferred[int]:
        """Append in order while C{holder} has the lease: how many, or -1 (not ours)."""

    def tail(self, count: int) -> Deferred[list[tuple[bytes, bytes]]]:
        """The newest C{count} entries as (channel, payload), oldest first."""


class Heard:
    """The messages a bridge heard, oldest first, each with the time it came and an
    absolute sequence number (which goes on counting when old ones are let go)."""

    def __init__(self) -> None:
        self._items: list[tuple[float, bytes, bytes]] = []
        self._start = 0
        #: The sequence number of the oldest message held.
        self.first = 0

    @property
    def end(self) -> int:
        """The sequence number the next message will get."""
        return self.first + len(self._items) - self._start

    def __len__(self) -> int:
        return len(self._items) - self._start

    def add(self, when: float, channel: bytes, payload: bytes) -> None:
        self._items.append((when, channel, payload))

    def forget(self, *, before: int, older_than: float, most: int) -> None:
        """Let go of the oldest messages numbered below C{before} that came before
        C{older_than} or are more than C{most}."""
        items = self._items
        start = self._start
        while (start < len(items) and self.first < before
               and (items[start][0] < older_than or len(items) - start > most)):
            start += 1
            self.first += 1
        if start > 1024 and start * 2 > len(items):
            del items[:start]
            start = 0
        self._start = start

    def clear(self) -> None:
        """Forget everything (numbers go on from L{end})."""
        self.first = self.end
        self._items = []
        self._start = 0

    def messages(self, start: int, stop: int) -> list[tuple[bytes, bytes]]:
        """(channel, payload) of the messages numbered C{start} to C{stop - 1}."""
        base = self._start - self.first
        return [(c, p) for _, c, p in self._items[base + start:base + stop]]


class Bridge(MultiService):
    """Appends the messages it hears to the history while it holds the lease.

    It is the subscriber's L{emojistream.redisconn.MessageHandler}; C{feed} is that
    subscriber's connection (its C{state} says whether it hears), C{history} the
    commands to Redis. C{clock} drives the lease.

    @ivar state: a L{State}.
    @ivar appended: messages appended since start.
    @ivar dropped: messages heard and never appended because too many waited.
    """

    log = Logger()

    def __init__(self, history: History, feed: Any = None, *, clock: Any, stream_key: str,
                 lease: float = DEFAULT_LEASE, ident: str | None = None,
                 max_pending: int = MAX_PENDING, max_heard: int = MAX_HEARD,
                 tail_entries: int = TAIL_ENTRIES) -> None:
        super().__init__()
        self.ident = ident or bridge_id()
        self.state = State.DOWN
        self.appended = 0
        self.dropped = 0
        self._history = history
        #: The subscriber's connection (given once built: it needs the bridge too).
        self.feed = feed
        self._clock = clock
        self._key = stream_key
        self._lease = lease
        #: The channel a bridge giving the lease up announces it on.
        self.release_channel = release_channel(stream_key)
        self._max_pending = max_pending
        self._max_heard = max_heard
        self._tail_entries = tail_entries
        self._heard = Heard()
        # Active: messages numbered below this are in the stream (once aligned).
        self._acked = 0
        self._aligned = False
        self._aligning = False
        self._tail: list[tuple[bytes, bytes]] | None = None
        self._align_deadline: IDelayedCall | None = None
        self._in_flight = 0
        # Bumped whenever the bridge stops being active: late answers are ignored.
        self._term = 0
        self._valid_until = 0.0
        self._asking = False
        self._hold_until = 0.0
        self._stopping = False
        self._drop_logged_at: float | None = None
        self._drops_unlogged = 0
        # Fired once nothing waits to be appended (or nothing more can be).
        self._flushed: Deferred[None] | None = None
        timer = TimerService(lease / 3, self._tick)
        timer.clock = clock
        timer.setServiceParent(self)

    # -- what the subscriber hands over ------------------------------------------

    def hears_through(self, feed: Any) -> None:
        """The subscriber's connection, built after the bridge (it hands messages to
        it): its state says whether the bridge hears what is published."""
        self.feed = feed

    def message(self, channel: bytes, payload: bytes) -> None:
        """One pub/sub message, as published."""
        if channel == self.release_channel:
            if payload != self.ident.encode() and self.state == State.STANDBY:
                # The holder gave the lease up, after its last append: everything
                # it appended has reached us too (one order for all subscribers).
                self._clock.callLater(0, self._ask)
            return
        heard = self._heard
        if self.state == State.ACTIVE and heard.end - self._acked >= self._max_pending:
            self.dropped += 1
            self._drops_unlogged += 1
            return
        heard.add(self._clock.seconds(), channel, payload)

    def read_started(self) -> None:
        """Nothing to do before a read's messages."""

    def read_done(self) -> None:
        """A read's messages are all in: append them (one call for all)."""
        if self.state != State.ACTIVE:
            return
        if self._aligned:
            self._send()
        elif self._tail is not None:
            self._try_align()

    def subscribing(self) -> None:
        """A new subscription begins: what was heard before may not run on into
        what comes now, so it is forgotten; a holder gives the lease up, for a
        standby that heard what this one missed."""
        if self.state == State.ACTIVE:
            lost = self._heard.end - self._acked - self._in_flight
            if lost > 0 and self._aligned:
                self.dropped += lost
                self._drops_unlogged += lost
            self._give_up("its subscription was lost; a standby that heard what it "
                          "missed may take over")
        self._heard.clear()
        self._acked = self._heard.end

    # -- the lease ---------------------------------------------------------------

    def _tick(self) -> None:
        """Every third of a lease: forget old messages, renew or try for the lease."""
        try:
            now = self._clock.seconds()
            self._forget(now)
            self._log_drops(now)
            if self._stopping:
                return
            if self.feed.state != "up" or not self._history.up:
                why = ("its subscription is down" if self.feed.state != "up"
                       else "its command connection is down")
                if self.state == State.ACTIVE and now > self._valid_until:
                    self._lose(f"the lease ran out unrenewed ({why})")
                if self.state == State.ACTIVE and self.feed.state != "up":
                    self._give_up(why)
                if self.state != State.ACTIVE:
                    self._set_down(why)
                return
            if self.state == State.ACTIVE and now > self._valid_until:
                self._lose("the lease ran out unrenewed")
            if now >= self._hold_until:
                self._ask()
        except Exception:
            self.log.failure("Bridge {ident}: the lease check failed", ident=self.ident)

    def _forget(self, now: float) -> None:
        keep_from = self._acked if self.state == State.ACTIVE else self._heard.end
        self._heard.forget(before=keep_from, older_than=now - HEARD_LEASES * self._lease,
                           most=self._max_heard)

    def _ask(self) -> None:
        """Take or renew the lease (one question at a time)."""
        if self._asking or self._stopping or not self._history.up:
            return
        self._asking = True
        asked_at = self._clock.seconds()
        term = self._term
        d = self._history.acquire(self.ident, int(self._lease * 1000))

        def answered(reply: tuple[int, bytes]) -> None:
            code, holder = reply
            if self._stopping:
                return
            if term != self._term:
                return  # it stopped or started being active meanwhile: ask again
            if code in (1, 2):
                self._valid_until = asked_at + self._lease
                if self.state != State.ACTIVE:
                    self._activate()
                elif code == 2 or not (self._aligned or self._aligning):
                    # Taken anew, or an append's outcome unknown: find our place.
                    self._aligned = False
                    self._align()
            elif self.state == State.ACTIVE:
                self._lose(f"bridge {holder.decode(errors='replace')} holds it now")
            elif self.state != State.STANDBY:
                self.state = State.STANDBY
                self.log.info("Bridge {ident} stands by: bridge {holder} appends to "
                              "{key}", ident=self.ident, key=self._key,
                              holder=holder.decode(errors="replace"))

        def failed(reason: Failure) -> None:
            # No answer says nothing of the lease: the local validity decides.
            pass

        def done(_: object) -> None:
            self._asking = False

        d.addCallbacks(answered, failed).addErrback(self._unexpected).addBoth(done)

    def _activate(self) -> None:
        self.state = State.ACTIVE
        self._term += 1
        self._aligned = False
        self._aligning = False
        self._acked = self._heard.first
        self.log.info("Bridge {ident} is the active bridge: appending to {key}",
                      ident=self.ident, key=self._key)
        self._align()

    def _lose(self, why: str) -> None:
        """No longer the holder: stand by (what waited is the new holder's to append)."""
        self.log.warn("Bridge {ident} lost the lease on {key}: {why}", ident=self.ident,
                      key=self._key, why=why)
        self._deactivate(State.STANDBY)

    def _deactivate(self, state: State) -> None:
        self.state = state
        self._term += 1
        self._aligned = False
        self._aligning = False
        self._tail = None
        self._in_flight = 0
        if self._align_deadline is not None and self._align_deadline.active():
            self._align_deadline.cancel()
        self._align_deadline = None
        self._check_flushed()

    def _set_down(self, why: str) -> None:
        if self.state != State.DOWN:
            self.log.warn("Bridge {ident} is down: {why}", ident=self.ident, why=why)
        self.state = State.DOWN

    def _give_up(self, why: str) -> None:
        """Give the lease up now (what is in flight lands or is fenced out), and wait
        a renewal interval before trying again: a standby goes first."""
        self.log.warn("Bridge {ident} gives the lease on {key} up: {why}",
                      ident=self.ident, key=self._key, why=why)
        self._deactivate(State.STANDBY)
        self._hold_until = self._clock.seconds() + self._lease / 3
        self._release()

    def _release(self) -> Deferred[int]:
        """Give the lease up: 1 if it was ours, 0 if not or unknown (it runs out)."""
        d = self._history.release(self.ident) if self._history.up else succeed(0)

        def unknown(reason: Failure) -> int:
            return 0

        return d.addErrback(unknown)

    # -- appending ---------------------------------------------------------------

    def _align(self) -> None:
        """Read the stream's newest entries, then append what follows them."""
        if self._aligning or not self._history.up:
            return
        self._aligning = True
        self._tail = None
        term = self._term

        def got(tail: list[tuple[bytes, bytes]]) -> None:
            if term != self._term:
                return
            self._tail = tail
            self._align_deadline = self._clock.callLater(self._lease / 3,
                                                         self._align_anyway)
            self._try_align()

        def failed(reason: Failure) -> None:
            if term == self._term:
                self._aligning = False  # the next renewal tries again

        self._history.tail(self._tail_entries).addCallbacks(got, failed).addErrback(
            self._unexpected)

    def _try_align(self) -> None:
        tail = self._tail
        assert tail is not None
        heard = self._heard
        found = align(heard.messages(heard.first, heard.end), tail)
        if found is None and tail:
            return  # not heard yet, perhaps: again after the next read
        self._aligned_at(heard.first + (found or 0))

    def _align_anyway(self) -> None:
        self._align_deadline = None
        if self.state != State.ACTIVE or self._aligned or self._tail is None:
            return
        self.log.warn("Bridge {ident}: the newest entry of {key} is not among the {n} "
                      "messages it heard; appending them all (the stream may miss "
                      "messages nobody heard, or hold some twice if this bridge was "
                      "that far behind)", ident=self.ident, key=self._key,
                      n=len(self._heard))
        self._aligned_at(self._heard.first)

    def _aligned_at(self, acked: int) -> None:
        self._acked = acked
        self._aligned = True
        self._aligning = False
        self._tail = None
        if self._align_deadline is not None and self._align_deadline.active():
            self._align_deadline.cancel()
        self._align_deadline = None
        self._send()

    def _send(self) -> None:
        """Append the next batch of what waits, unless a batch is in flight: one
        append at a time keeps the order whatever happens to a call."""
        if self._in_flight or not self._aligned or self.state != State.ACTIVE:
            return
        start = self._acked
        stop = min(self._heard.end, start + APPEND_BATCH)
        if stop <= start:
            return
        batch = self._heard.messages(start, stop)
        self._in_flight = len(batch)
        term = self._term
        d = self._history.append(self.ident, batch)

        def appended(count: int) -> None:
            if term != self._term:
                return
            self._in_flight = 0
            if count < 0:
                self._lose("another bridge took it (an append was fenced out)")
                return
            self.appended += count
            self._acked = start + count
            self._send()
            self._check_flushed()

        def failed(reason: Failure) -> None:
            if term != self._term:
                return
            self._in_flight = 0
            # Appended or not, who knows: read the stream again when Redis answers.
            self._aligned = False
            self.log.warn("Bridge {ident}: an append to {key} failed ({why}); "
                          "realigning with the stream", ident=self.ident, key=self._key,
                          why=reason.getErrorMessage())
            self._check_flushed()
            self._align()

        d.addCallbacks(appended, failed).addErrback(self._unexpected)

    def _log_drops(self, now: float) -> None:
        if not self._drops_unlogged:
            return
        last = self._drop_logged_at
        if last is not None and now - last < DROP_LOG_PERIOD:
            return
        self.log.warn("Bridge {ident} dropped {n} messages (more than {most} waited for "
                      "Redis to take them); {total} since start", ident=self.ident,
                      n=self._drops_unlogged, most=self._max_pending, total=self.dropped)
        self._drop_logged_at = now
        self._drops_unlogged = 0

    def _unexpected(self, reason: Failure) -> None:
        self.log.failure("Bridge {ident}: unexpected failure", reason, ident=self.ident)

    # -- the service -------------------------------------------------------------

    def summary(self) -> str:
        """One line for a service manager's status."""
        return (f"{self.state}, {self.appended} appended, {self.dropped} dropped "
                f"to {self._key}")

    def _check_flushed(self) -> None:
        waiter = self._flushed
        if waiter is None:
            return
        if (self.state != State.ACTIVE or not self._aligned
                or (not self._in_flight and self._acked >= self._heard.end)):
            self._flushed = None
            waiter.callback(None)

    def stopService(self) -> Deferred[None]:
        """Append what waits (for L{STOP_FLUSH} seconds at most), then give the lease
        up and tell the standbys."""
        super().stopService()
        self._stopping = True
        self._log_drops(self._clock.seconds() + DROP_LOG_PERIOD)
        if self.state != State.ACTIVE:
            self._deactivate(self.state)
            return succeed(None)
        flushed: Deferred[None] = Deferred()
        self._flushed = flushed
        deadline = self._clock.callLater(STOP_FLUSH, self._check_flushed_anyway)
        self._send()
        self._check_flushed()

        def release(_: None) -> Deferred[None]:
            if deadline.active():
                deadline.cancel()
            was_active = self.state == State.ACTIVE
            self._deactivate(State.DOWN)
            if not was_active:
                return succeed(None)
            return self._release().addCallback(released)

        def released(ours: int) -> None:
            if ours:
                self.log.info("Bridge {ident} released the lease on {key}",
                              ident=self.ident, key=self._key)

        return flushed.addCallback(release)

    def _check_flushed_anyway(self) -> None:
        waiter, self._flushed = self._flushed, None
        if waiter is not None:
            self.log.warn("Bridge {ident}: {n} messages were still waiting for Redis "
                          "after {s:g} s; giving the lease up without them",
                          ident=self.ident, n=self._heard.end - self._acked, s=STOP_FLUSH)
            waiter.callback(None)


# -- Redis -------------------------------------------------------------------------


def run_script(connection: Any, script: str, digest: str, keys: Sequence[str],
               args: Sequence[Any]) -> Deferred[Any]:
    """C{EVALSHA}, and C{EVAL} if Redis has not got the script (NOSCRIPT: nothing ran)."""
    protocol = connection.protocol
    if protocol is None:
        return fail(NotConnected(f"{connection.description} is down"))
    d: Deferred[Any] = maybeDeferred(protocol.execute_command, "EVALSHA", digest,
                                     len(keys), *keys, *args)

    def noscript(reason: Failure) -> Any:
        if reason.check(txredisapi.ResponseError) and "NOSCRIPT" in str(reason.value):
            again = connection.protocol
            if again is None:
                return fail(NotConnected(f"{connection.description} is down"))
            return again.execute_command("EVAL", script, len(keys), *keys, *args)
        return reason

    return d.addErrback(noscript)


class RedisHistory:
    """L{History} over a kept-up Redis command connection (L{RedisConnection})."""

    _APPEND = sha1(APPEND_SCRIPT)
    _ACQUIRE = sha1(ACQUIRE_SCRIPT)
    _RELEASE = sha1(RELEASE_SCRIPT)

    def __init__(self, connection: Any, stream_key: str, *, maxlen: int,
                 token: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        self._connection = connection
        self._key = stream_key
        self._maxlen = maxlen
        self._token = token

    @property
    def up(self) -> bool:
        return bool(self._connection.state == "up")

    def acquire(self, holder: str, lease_ms: int) -> Deferred[tuple[int, bytes]]:
        d = run_script(self._connection, ACQUIRE_SCRIPT, self._ACQUIRE,
                       [lease_key(self._key)], [holder, lease_ms])
        return d.addCallback(lambda reply: (int(reply[0]), reply[1] or b""))

    def release(self, holder: str) -> Deferred[int]:
        return run_script(self._connection, RELEASE_SCRIPT, self._RELEASE,
                          [lease_key(self._key)], [holder, release_channel(self._key)]
                          ).addCallback(int)

    def append(self, holder: str, messages: Sequence[tuple[bytes, bytes]]
               ) -> Deferred[int]:
        keys, args = append_call(self._key, messages, maxlen=self._maxlen,
                                 epoch_token=self._token(), holder=holder)
        return run_script(self._connection, APPEND_SCRIPT, self._APPEND, keys, args
                          ).addCallback(lambda reply: int(reply[0]))

    def tail(self, count: int) -> Deferred[list[tuple[bytes, bytes]]]:
        protocol = self._connection.protocol
        if protocol is None:
            return fail(NotConnected(f"{self._connection.description} is down"))
        d: Deferred[list[Any]] = maybeDeferred(
            protocol.execute_command, "XREVRANGE", self._key, "+", "-", "COUNT", count)

        def entries(reply: list[Any]) -> list[tuple[bytes, bytes]]:
            out = []
            for _id, fields in reversed(reply or []):
                try:
                    out.append(decode_entry(fields))
                except ValueError:
                    # Another writer's entry: matches nothing a bridge heard.
                    out.append((b"", b""))
            return out

        return d.addCallback(entries)


class Subscriber(RedisConnection):
    """The bridge's pub/sub connection: on every (re)connection tells the bridge a
    new subscription begins, then subscribes to C{channels} and C{patterns} at once
    (one write, so no message falls between the two)."""

    def __init__(self, address: RedisAddress, bridge: Bridge, *, reactor: Any,
                 channels: tuple[bytes, ...], patterns: tuple[bytes, ...],
                 **kwargs: Any) -> None:
        self._bridge = bridge
        self._channels = channels
        self._patterns = patterns
        super().__init__(
            address, reactor=reactor, purpose="subscriber",
            build=lambda **options: SubscriberProtocol(bridge, **options),
            prepare=self._subscribe, select_db=False, **kwargs)

    def _subscribe(self, protocol: SubscriberProtocol) -> Deferred[Any]:
        self._bridge.subscribing()
        calls = [protocol.subscribe(list(self._channels))]
        if self._patterns:
            calls.append(protocol.psubscribe(list(self._patterns)))
        return gatherResults(calls, consumeErrors=True)
