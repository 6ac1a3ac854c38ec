"""The stream source (C{--source streams}): the node reads the shared history, the
Redis Stream a bridge appends to (L{emojistream.history}), instead of subscribing.

L{StreamFeed} is one kept-up Redis connection, given over to reading: on each
(re)connection it looks where to read from, then loops C{XREAD COUNT 1000 BLOCK 1000
STREAMS <key> <last ID>}, handing each reply's entries to its handler (the router, a
L{emojistream.history.StreamHandler}), each with its position. A connection lost
and found again reads on from the last entry it handed on: the node's clients get
late events, not missing ones. It calls the handler's C{start} again (and counts a
gap, by reason) only when it cannot go on exactly where it left off: the stream was
replaced (another epoch) or the entries after its last one were trimmed meanwhile.

L{StreamWatch} asks, over the command connection, what operators want to see: the
stream's length, how far behind its newest entry the feed is, and the bridge's lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import (
    Deferred,
    FirstError,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from emojistream.config import RedisAddress
from emojistream.history import (
    EntryId,
    StreamHandler,
    decode_entry,
    epoch_key,
    lease_key,
    parse_entry_id,
    position,
)
from emojistream.redisconn import RedisConnection
from emojistream.waiting import Waiters

#: Seconds an XREAD waits for entries: an idle stream still answers this often, which
#: is the reader's heartbeat.
BLOCK = 1.0
#: Seconds past L{BLOCK} an XREAD may take before its connection is taken for dead
#: and replaced (a wedged proxy, a dead NAT entry).
READ_MARGIN = 2.0
#: Entries one XREAD brings at most; a full page's successor waits for the next
#: reactor turn, so a node catching up does not starve its clients.
PAGE = 1000
#: Seconds between two looks for a stream that does not exist (yet).
POLL = 1.0
#: Seconds between two log lines about entries that are not emojistream's.
FOREIGN_LOG_PERIOD = 60.0
#: Why the feed could not go on where it left off (the gaps it counts).
REPLACED = "replaced"
TRIMMED = "trimmed"
#: Entries counted at most for the lag: a lag of this many means this many or more.
LAG_CAP = 1000
#: Seconds between two looks at the stream's length, the lag and the bridge's lease.
WATCH_INTERVAL = 2.0


def _send(protocol: Any, *args: Any) -> Deferred[Any]:
    """One command; a failure (not a raise) if the connection is gone."""
    return maybeDeferred(protocol.execute_command, *args)


def transaction(protocol: Any, commands: Sequence[tuple[Any, ...]]) -> Deferred[list[Any]]:
    """C{commands} in one MULTI/EXEC (one snapshot of Redis): their replies, or a
    failure with the first error reply among them."""
    queued = [_send(protocol, "MULTI"), *(_send(protocol, *c) for c in commands)]
    for d in queued:
        # What matters is EXEC's reply (an error in a command aborts it).
        d.addErrback(lambda failure: None)

    def replies(reply: Any) -> list[Any]:
        if not isinstance(reply, list):
            raise ValueError(f"EXEC answered {reply!r:.80}")
        for item in reply:
            if isinstance(item, Exception):
                raise item
        return reply

    return _send(protocol, "EXEC").addCallback(replies)


def _text(reply: Any) -> str | None:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else None


class StreamFeed(RedisConnection):
    """Reads the stream C{stream_key} and hands its entries to C{handler}.

    @ivar epoch: the epoch of the entries handed on (None before the first start).
    @ivar position: the position of the newest entry handed on (or where the latest
        start said entries follow from); 0 before the first start.
    @ivar last_id: that entry's ID, where the next XREAD reads from.
    @ivar entries: entries handed on since start.
    @ivar reads: XREAD replies since start.
    @ivar skipped: entries that are not emojistream's (not handed on).
    @ivar gaps: times the feed started again, by why (L{REPLACED}, L{TRIMMED}).
    @ivar waiting: whether it is waiting for the stream to exist.
    """

    log = Logger()

    def __init__(self, address: RedisAddress, handler: StreamHandler, *, reactor: Any,
                 stream_key: str, block: float = BLOCK, margin: float = READ_MARGIN,
                 count: int = PAGE, poll: float = POLL, **kwargs: Any) -> None:
        self._handler = handler
        self.stream_key = stream_key
        self._epoch_key = epoch_key(stream_key)
        self._block_ms = max(1, round(block * 1000))
        self._deadline = block + margin
        self._count = count
        self._poll = poll
        self.epoch: str | None = None
        self.position = 0
        self.last_id: EntryId | None = None
        self.entries = 0
        self.reads = 0
        self.skipped = 0
        self.gaps = {REPLACED: 0, TRIMMED: 0}
        self.waiting = False
        # Bumped on each connection and at stop: a callback of an earlier run is ignored.
        self._run = 0
        self._timer: IDelayedCall | None = None
        self._reading: Waiters[None] = Waiters()
        self._is_reading = False
        self._skipped_logged_at: float | None = None
        self._skipped_unlogged = 0
        super().__init__(address, reactor=reactor, purpose="stream reader",
                         prepare=self._locate, **kwargs)

    # -- the service -------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        self._run += 1
        self._cancel_timer()
        self._is_reading = False
        return super().stopService()

    def when_reading(self) -> Deferred[None]:
        """Fires once the feed reads the stream (or next does): after its start."""
        if self._is_reading and self.state == "up":
            return succeed(None)
        return self._reading.wait()

    def when_subscribed(self) -> Deferred[None]:
        """As the pub/sub feed's: fires once the connection is up."""
        return self.when_up()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- where to read from ------------------------------------------------------

    def _locate(self, protocol: Any) -> Deferred[None]:
        """A new connection (the prepare step): look where to read from."""
        self._run += 1
        self._is_reading = False
        self._cancel_timer()
        return self._look(protocol, self._run)

    def _look(self, protocol: Any, run: int) -> Deferred[None]:
        """The epoch, the newest entry and (if it has read some) whether its last
        entry is still there, in one snapshot; then read, or wait for the stream."""
        key = self.stream_key
        commands: list[tuple[Any, ...]] = [("GET", self._epoch_key),
                                           ("XREVRANGE", key, "+", "-", "COUNT", 1)]
        last = self.last_id
        if last is not None:
            commands.append(("XRANGE", key, str(last), "+", "COUNT", 1))
        return transaction(protocol, commands).addCallback(self._located, protocol, run)

    def _located(self, replies: list[Any], protocol: Any, run: int) -> None:
        if run != self._run:
            return
        epoch = _text(replies[0])
        newest = parse_entry_id(replies[1][0][0]) if replies[1] else None
        if epoch is None or newest is None:
            self._wait(protocol, run)
            return
        if self.waiting:
            self.waiting = False
        last = self.last_id
        if self.epoch is None or last is None:
            self.log.info("Reading {key} (epoch {epoch}) from its newest entry {id} on",
                          key=self.stream_key, epoch=epoch, id=str(newest))
            self._begin(epoch, newest)
        elif epoch != self.epoch:
            self.gaps[REPLACED] += 1
            self.log.warn("{key} was replaced (epoch {old}, now {epoch}): reading from "
                          "its newest entry {id} on; clients resuming from before get the "
                          "gap signal", key=self.stream_key, old=self.epoch, epoch=epoch,
                          id=str(newest))
            self._begin(epoch, newest)
        elif not (replies[2] and parse_entry_id(replies[2][0][0]) == last):
            self.gaps[TRIMMED] += 1
            self.log.warn("{key}: entries after {last}, the last this node read, were "
                          "trimmed before it read them: reading from its newest entry "
                          "{id} on; clients resuming from before get the gap signal",
                          key=self.stream_key, last=str(last), id=str(newest))
            self._begin(epoch, newest)
        else:
            self.log.info("Reading {key} on from entry {id} (epoch {epoch}): nothing "
                          "missed", key=self.stream_key, id=str(last), epoch=epoch)
        self._is_reading = True
        self._reading.fire(None)
        # On the next turn: the connection is up (its prepare step over) by then.
        self._timer = self._clock.callLater(0, self._read, protocol, run)

    def _begin(self, epoch: str, newest: EntryId) -> None:
        """Start (again) after C{newest}: the handler is told before any entry."""
        self.epoch = epoch
        self.last_id = newest
        self.position = position(newest)
        self._handler.start(epoch, self.position)

    def _wait(self, protocol: Any, run: int) -> None:
        if not self.waiting:
            self.waiting = True
            self.log.info("{key} does not exist (or holds nothing): waiting for entries "
                          "(a bridge appends them, or this daemon's --demo)",
                          key=self.stream_key)
        self._timer = self._clock.callLater(self._poll, self._look_again, protocol, run)

    def _look_again(self, protocol: Any, run: int) -> None:
        self._timer = None
        if run == self._run and protocol is self.protocol:
            self._look(protocol, run).addErrback(self._refused, protocol, run)

    # -- reading -----------------------------------------------------------------

    def _read(self, protocol: Any, run: int) -> None:
        """One XREAD from the last entry, and the epoch just after it (pipelined):
        entries of a replaced stream are never taken for the old one's."""
        self._timer = None
        if run != self._run or protocol is not self.protocol:
            return
        assert self.last_id is not None
        read = _send(protocol, "XREAD", "COUNT", self._count, "BLOCK", self._block_ms,
                     "STREAMS", self.stream_key, str(self.last_id))
        epoch = _send(protocol, "GET", self._epoch_key)
        deadline = self._clock.callLater(self._deadline, self._silent, protocol, run)
        gatherResults([read, epoch], consumeErrors=True).addCallbacks(
            self._got, self._read_failed, callbackArgs=(protocol, run, deadline),
            errbackArgs=(protocol, run, deadline))

    def _silent(self, protocol: Any, run: int) -> None:
        if run == self._run:
            self.hang_up(protocol, f"no answer to XREAD within {self._deadline:g} s")

    def _got(self, replies: list[Any], protocol: Any, run: int,
             deadline: IDelayedCall) -> None:
        if deadline.active():
            deadline.cancel()
        if run != self._run or protocol is not self.protocol:
            return
        reply, epoch = replies
        self.reads += 1
        if _text(epoch) != self.epoch:
            # Replaced (or gone) since the last look: what this read brought may be
            # the new stream's. Look again, as on a new connection.
            self._is_reading = False
            self._look(protocol, run).addErrback(self._refused, protocol, run)
            return
        entries = reply[0][1] if reply else ()
        if entries:
            self._hand(entries)
        if len(entries) >= self._count:
            self._timer = self._clock.callLater(0, self._read, protocol, run)
        else:
            self._read(protocol, run)

    def _hand(self, entries: Sequence[Any]) -> None:
        """One read's entries to the handler, bracketed, each with its position."""
        handler = self._handler
        handed = 0
        handler.read_started()
        try:
            for raw_id, fields in entries:
                entry = parse_entry_id(raw_id)
                self.last_id = entry
                try:
                    place = position(entry)
                    channel, payload = decode_entry(fields)
                except ValueError as e:
                    self._skip(str(e))
                    continue
                self.position = place
                handed += 1
                try:
                    handler.message(channel, payload, place)
                except Exception:
                    self.log.failure("Handling entry {id} of {key} failed", id=str(entry),
                                     key=self.stream_key)
        finally:
            self.entries += handed
            handler.read_done()

    def _skip(self, why: str) -> None:
        self.skipped += 1
        self._skipped_unlogged += 1
        now = self._clock.seconds()
        last = self._skipped_logged_at
        if last is not None and now - last < FOREIGN_LOG_PERIOD:
            return
        self.log.warn("{key} holds entries that are not emojistream's ({n} skipped since "
                      "the last such line, {total} in all), e.g. {why}",
                      key=self.stream_key, n=self._skipped_unlogged, total=self.skipped,
                      why=why)
        self._skipped_logged_at = now
        self._skipped_unlogged = 0

    def _read_failed(self, reason: Failure, protocol: Any, run: int,
                deadline: IDelayedCall) -> None:
        if deadline.active():
            deadline.cancel()
        self._refused(reason, protocol, run)

    def _refused(self, reason: Failure, protocol: Any, run: int) -> None:
        """A command failed: if the connection is still this one, Redis refused (a
        key that is not a stream...): a new connection, with backoff, says why."""
        if isinstance(reason.value, FirstError):
            reason = reason.value.subFailure
        if (run != self._run or protocol is not self.protocol
                or reason.check(txredisapi.ConnectionError)):
            return  # the connection was lost: the next one reads on
        self.hang_up(protocol, f"reading {self.stream_key} failed: "
                               f"{reason.getErrorMessage()}")


class StreamWatch:
    """What operators see of the stream, asked every L{WATCH_INTERVAL} seconds over
    C{connection} (a command connection: the feed's is busy reading).

    @ivar length: the stream's length (XLEN), None before the first answer.
    @ivar lag: entries after the feed's position (L{LAG_CAP} at most), None unknown.
    @ivar bridge: the lease as Redis holds it, C{{"holder": ..., "ttl_ms": ...}}, or
        None when no bridge holds it.
    """

    def __init__(self, feed: StreamFeed, connection: Any, *, clock: IReactorTime,
                 cap: int = LAG_CAP) -> None:
        self._feed = feed
        self._connection = connection
        self._clock = clock
        self._cap = cap
        self._asking = False
        self.length: int | None = None
        self.lag: int | None = None
        self.bridge: dict[str, Any] | None = None

    def check(self) -> Deferred[None] | None:
        """Ask Redis once (one question at a time; none while it is down)."""
        protocol = self._connection.protocol
        if protocol is None or self._asking:
            return None
        self._asking = True
        feed = self._feed
        key = feed.stream_key
        last = feed.last_id if feed.epoch is not None else None
        asked = [_send(protocol, "XLEN", key), _send(protocol, "GET", lease_key(key)),
                 _send(protocol, "PTTL", lease_key(key))]
        if last is not None:
            # From the last entry read, inclusive: the exclusive form needs Redis 6.2.
            asked.append(_send(protocol, "XRANGE", key, str(last), "+", "COUNT",
                               self._cap + 1))

        def answered(replies: list[Any]) -> None:
            length, holder, ttl = replies[:3]
            self.length = length if isinstance(length, int) else None
            name = _text(holder)
            self.bridge = (None if name is None
                           else {"holder": name, "ttl_ms": ttl if isinstance(ttl, int) else None})
            if last is None:
                self.lag = None
                return
            after = [e for e in replies[3] if parse_entry_id(e[0]) > last]
            self.lag = min(len(after), self._cap)

        def unanswered(reason: Failure) -> None:
            # Nothing new known: the figures stand until the next answer.
            pass

        def done(_: object) -> None:
            self._asking = False

        return gatherResults(asked, consumeErrors=True).addCallbacks(
            answered, unanswered).addBoth(done)

    def figures(self) -> dict[str, Any]:
        """The stream as status shows it."""
        feed = self._feed
        return {
            "key": feed.stream_key,
            "state": "waiting" if feed.waiting else feed.state,
            "epoch": feed.epoch,
            "position": str(feed.last_id) if feed.last_id is not None else None,
            "length": self.length,
            "lag": self.lag,
            "entries_read": feed.entries,
            "reads": feed.reads,
            "skipped": feed.skipped,
            "gaps": dict(feed.gaps),
            "bridge": self.bridge,
        }
