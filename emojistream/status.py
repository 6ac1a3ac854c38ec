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
        self._cached: tuple[float, bytes, list[bytes], bytes] | None = None
        #: Documents built for the web since start (not counting cache hits).
        self.builds = 0

    def _current(self) -> tuple[bytes, list[bytes]]:
        now = self._clock.seconds()
        cached = self._cached
        if cached is None or not 0 <= now - cached[0] < CACHE_SECONDS:
            head = self._head(now)
            connections = self._hub.snapshot_json(now)
            self.builds += 1
            cached = (now, head, connections,
                      head + b',"connections":[' + b",".join(connections) + b"]}")
            self._cached = cached
        return cached[1], cached[2]

    def _head(self, now: float) -> bytes:
        """The document without its connections, as JSON lacking the closing brace."""
        document = self.document(now, connections=False)
        return json.dumps(document, separators=(",", ":")).encode()[:-1]

    def encoded(self) -> bytes:
        """The whole document as compact JSON, at most a second old (also what the
        admin report writes to Redis)."""
        self._current()
        assert self._cached is not None
        return self._cached[3]

    def page(self, offset: int, limit: int) -> bytes:
        """The document with only connections C{offset} to C{offset + limit} (oldest
        first), and C{connections_total}: for a page that shows a few at a time."""
        head, connections = self._current()
        return b'%s,"connections_total":%d,"offset":%d,"connections":[%s]}' % (
            head, len(connections), offset, b",".join(connections[offset:offset + limit]))

    def document(self, now: float | None = None, connections: bool = True
                 ) -> dict[str, Any]:
        """The status as a JSON-ready dict; C{status} is "OK" only while subscribed."""
        if now is None:
            now = self._clock.seconds()
        redis = self._feed.state
        document: dict[str, Any] = {
            "node": self._node,
            "status": "OK" if redis == "up" else "REDIS_" + redis.upper(),
            "reported_at": int(now),
            "redis": redis,
            "pools": self._hub.pool_sizes(),
            "totals": dict(self._counters()),
        }
        if connections:
            document["connections"] = self._hub.snapshot(now)
        return document
