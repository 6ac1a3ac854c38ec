"""The Redis subscriber: the pub/sub connection that feeds every stream."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

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
