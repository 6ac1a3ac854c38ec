"""The Redis subscriber: the pub/sub connection that feeds every stream, and what
readiness makes of it (a replica cut off from its primary feeds nothing)."""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from emojistream.config import RedisAddress
from emojistream.redisconn import MessageHandler, RedisConnection, SubscriberProtocol


class RedisFeed(RedisConnection):
    """Subscribes to C{channels} and C{patterns} on every (re)connection.

    Each message goes to C{handler.message(channel, payload)} as bytes, exactly as
    published, each read's messages bracketed by C{handler.read_started} and
    C{handler.read_done}. A new connection subscribes once, so nothing arrives twice.
    """

    def __init__(
        self,
        address: RedisAddress,
        handler: MessageHandler,
        *,
        reactor: Any,
        channels: tuple[bytes, ...],
        patterns: tuple[bytes, ...],
        **kwargs: Any,
    ) -> None:
        self._channels = channels
        self._patterns = patterns
        super().__init__(
            address, reactor=reactor, purpose="subscriber",
            build=lambda **options: SubscriberProtocol(handler, **options),
            prepare=self._subscribe, select_db=False, **kwargs,
        )

    @inlineCallbacks
    def _subscribe(self, protocol: SubscriberProtocol) -> Any:
        if self._channels:
            yield protocol.subscribe(list(self._channels))
        if self._patterns:
            yield protocol.psubscribe(list(self._patterns))

    def when_subscribed(self) -> Deferred[None]:
        """A Deferred that fires once the feed is (or next becomes) subscribed."""
        return self.when_up()


#: Seconds between two looks at the replication link of the Redis the feed reads.
REPLICA_CHECK = 2.0
#: Checks a verdict outlives without a new answer (the command connection down).
VERDICT_CHECKS = 3
#: The feed's state while it is subscribed to a replica cut off from its primary.
REPLICA_UNLINKED = "replica_unlinked"


def parse_info(reply: bytes) -> dict[str, str]:
    """An C{INFO} reply as C{field -> value} (section headers and blank lines left out)."""
    fields: dict[str, str] = {}
    for line in reply.decode("utf-8", "replace").splitlines():
        name, colon, value = line.partition(":")
        if colon and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def replica_unlinked(info: dict[str, str]) -> bool:
    """Whether C{INFO replication} describes a replica whose link to its primary is
    down (or still syncing): subscribed there, a client hears nothing the feeder
    publishes on the primary."""
    return info.get("role") == "slave" and info.get("master_link_status") != "up"


class ReplicaWatch:
    """The feed's state as readiness and status should see it: C{"up"} only while
    subscribed and the Redis it subscribes to is a primary or a replica linked to
    its primary; L{REPLICA_UNLINKED} while it is a replica without one.

    L{check} (every L{REPLICA_CHECK} seconds, on a timer) asks C{INFO replication}
    over C{connection}, a command connection to the feed's Redis (the subscriber's own
    cannot: in pub/sub mode Redis takes no other command). A verdict holds for
    L{VERDICT_CHECKS} intervals without a new answer; with none (no answer yet, the
    command connection down, INFO refused) readiness follows the subscription alone.
    """

    log = Logger()

    def __init__(self, feed: Any, connection: Any, *, clock: IReactorTime,
                 interval: float = REPLICA_CHECK) -> None:
        self._feed = feed
        self._connection = connection
        self._clock = clock
        self._interval = interval
        self._unlinked = False
        self._answered_at: float | None = None
        self._asking = False
        self._refused = False
        #: The latest check's Deferred (None before the first question).
        self.last_check: Deferred[None] | None = None

    @property
    def state(self) -> str:
        """The feed's state, or L{REPLICA_UNLINKED} in place of C{"up"}."""
        state: str = self._feed.state
        if state == "up" and self.unlinked:
            return REPLICA_UNLINKED
        return state

    @property
    def unlinked(self) -> bool:
        """Whether the latest answer, if recent, said: a replica without its primary."""
        at = self._answered_at
        return (self._unlinked and at is not None
                and self._clock.seconds() - at <= VERDICT_CHECKS * self._interval)

    def check(self) -> Deferred[None] | None:
        """Ask Redis once (one question at a time; none while it is down)."""
        protocol = self._connection.protocol
        if protocol is None or self._asking:
            return None
        self._asking = True
        d: Deferred[bytes] = protocol.execute_command("INFO", "replication")
        self.last_check = d.addCallbacks(self._answered, self._not_answered).addBoth(
            self._asked)
        return self.last_check

    def _asked(self, result: None) -> None:
        self._asking = False

    def _answered(self, reply: object) -> None:
        if not isinstance(reply, bytes):
            self._refuse(f"INFO answered {reply!r:.60}")
            return
        unlinked = replica_unlinked(parse_info(reply))
        self._answered_at = self._clock.seconds()
        self._refused = False
        if unlinked != self._unlinked:
            if unlinked:
                self.log.warn("{what} reaches a replica whose link to its primary is "
                              "down: not ready, as nothing published reaches it",
                              what=self._connection.description)
            else:
                self.log.info("{what} reaches a primary, or a replica linked to its "
                              "primary again: ready", what=self._connection.description)
        self._unlinked = unlinked

    def _not_answered(self, reason: Failure) -> None:
        # A lost connection says nothing of the link: the verdict stands (and ages).
        if reason.check(txredisapi.ResponseError):
            self._refuse(reason.getErrorMessage())

    def _refuse(self, why: str) -> None:
        self._answered_at = None
        if not self._refused:
            self._refused = True
            self.log.warn("Cannot check Redis replication ({why}); readiness follows "
                          "the subscription alone", why=why)
