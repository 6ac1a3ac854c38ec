"""The status document: what /admin/status.json serves and the admin cluster receives."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from emojistream.hub import Hub


class HasState(Protocol):
    """Anything with a connection C{state} string (the Redis feed)."""

    state: str


#: Seconds one built status.json serves every request for.
CACHE_SECONDS = 1.0


class StatusReport:
    """Builds this node's status: identity, health, and every open connection.

    With 10,000 streams the document is megabytes and tens of milliseconds of the
    reactor's time, so what the web serves (L{encoded}, L{page}) is built at most
    once per L{CACHE_SECONDS} and the same bytes go to every request in between.
    """

    def __init__(self, hub: Hub, feed: HasState, *, node: str, clock: IReactorTime,
                 counters: Callable[[], Mapping[str, float]] = dict) -> None:
        self._hub = hub
        self._feed = feed
        self._node = node
        self._clock = clock
        self._counters = counters
        self._cached: tuple[float, dict[str, Any], bytes] | None = None
        #: Documents built for the web since start (not counting cache hits).
        self.builds = 0

    def _current(self) -> tuple[dict[str, Any], bytes]:
        now = self._clock.seconds()
        cached = self._cached
        if cached is None or not 0 <= now - cached[0] < CACHE_SECONDS:
            document = self.document()
            self.builds += 1
            cached = (now, document, json.dumps(document, separators=(",", ":")).encode())
            self._cached = cached
        return cached[1], cached[2]

    def encoded(self) -> bytes:
        """The whole document as compact JSON, at most a second old."""
        return self._current()[1]

    def page(self, offset: int, limit: int) -> bytes:
        """The document with only connections C{offset} to C{offset + limit} (oldest
        first), and C{connections_total}: for a page that shows a few at a time."""
        document, _ = self._current()
        connections = document["connections"]
        paged = {**document, "connections": connections[offset:offset + limit],
                 "connections_total": len(connections), "offset": offset}
        return json.dumps(paged, separators=(",", ":")).encode()

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
