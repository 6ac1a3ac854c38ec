"""The status document: what /admin/status.json serves and the admin cluster receives."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from emojistream.hub import Hub


class HasState(Protocol):
    """Anything with a connection C{state} string (the Redis feed)."""

    state: str


class StatusReport:
    """Builds this node's status: identity, health, and every open connection."""

    def __init__(self, hub: Hub, feed: HasState, *, node: str, clock: IReactorTime,
                 counters: Callable[[], Mapping[str, float]] = dict) -> None:
        self._hub = hub
        self._feed = feed
        self._node = node
        self._clock = clock
        self._counters = counters

    def document(self) -> dict[str, Any]:
        """The status as a JSON-ready dict; C{status} is "OK" only while subscribed."""
        now = self._clock.seconds()
        redis = self._feed.state
        return {
            "node": self._node,
            "status": "OK" if redis == "up" else "REDIS_" + redis.upper(),
            "reported_at": int(now),
            "redis": redis,
            "pools": self._hub.pool_sizes(),
            "totals": dict(self._counters()),
            "connections": self._hub.snapshot(now),
        }
