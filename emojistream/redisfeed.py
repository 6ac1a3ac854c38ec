"""The Redis subscriber: the pub/sub connection that feeds every stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from emojistream.config import RedisAddress
from emojistream.redisconn import RedisConnection, SubscriberProtocol


class RedisFeed(RedisConnection):
    """Subscribes to C{channels} and C{patterns} on every (re)connection.

    Each message goes to C{on_message(channel, payload)} as bytes, exactly as
    published; C{read_started} and C{read_done} bracket the messages of each read.
    A new connection subscribes once, so nothing arrives twice.
    """

    def __init__(
        self,
        address: RedisAddress,
        on_message: Callable[[bytes, bytes], None],
        *,
        reactor: Any,
        channels: tuple[bytes, ...],
        patterns: tuple[bytes, ...],
        read_started: Callable[[], None] | None = None,
        read_done: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._channels = channels
        self._patterns = patterns

        def configure(protocol: SubscriberProtocol) -> None:
            protocol.on_message = on_message
            if read_started is not None:
                protocol.read_started = read_started
            if read_done is not None:
                protocol.read_done = read_done

        super().__init__(
            address, reactor=reactor, purpose="subscriber", protocol_class=SubscriberProtocol,
            configure=configure, prepare=self._subscribe, select_db=False, **kwargs,
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
