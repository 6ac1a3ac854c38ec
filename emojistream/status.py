"""The status document: what /admin/status.json serves and the admin cluster receives."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from emojistream.cache import fresh
from emojistream.hub import Hub
from emojistream.slices import each_slice, slice_per_turn
from emojistream.stream import Stream
from emojistream.waiting import Waiters


class HasState(Protocol):
    """Anything with a connection C{state} string (the Redis feed, as readiness sees it)."""

    @property
    def state(self) -> str: ...


#: Connections encoded per reactor turn while a status document is built.
SLICE = 1000


#: Totals whose per-second rates status and the cluster view show: in from Redis,
#: out to clients, clients dropped.
RATES = {"in": "messages.received", "out": "messages.delivered",
         "dropped": "connections.dropped"}


class RateMeter:
    """Per second, between the last few samples of one node's totals: in from Redis,
    out to clients, clients dropped (L{RATES}). Status samples its own totals at each
    build (at most one a second, and every 5 s with the admin report), so that rates
    cost no scan of the streams of their own; the cluster view keeps one per node for
    the nodes that report none, sampling the totals of each new report.
    """

    def __init__(self, samples: int = 3) -> None:
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=samples)

    def sample(self, now: float, totals: Mapping[str, float]) -> dict[str, float]:
        """Take C{totals} at C{now}; the rates per second between the oldest sample
        kept and this one (empty before two). The same moment again replaces its
        sample; a moment before the last (a clock set back, a node restarted) starts
        again; a total that went down (a restart) counts as no change."""
        values = {key: totals.get(total, 0) for key, total in RATES.items()}
        samples = self._samples
        if samples and samples[-1][0] >= now:
            if samples[-1][0] > now:
                samples.clear()
            else:
                samples.pop()  # the same moment again
        samples.append((now, values))
        (t0, old), (t1, new) = samples[0], samples[-1]
        if t1 <= t0:
            return {}
        return {key: round(max(0.0, new[key] - old[key]) / (t1 - t0), 1) for key in RATES}


class _Built(NamedTuple):
    """One status document as built: when, its head, each connection encoded, the
    whole, and each connection's (request path, client IP) for filtering pages."""

    at: float
    head: bytes
    connections: list[bytes]
    whole: bytes
    keys: list[tuple[str, str]]


class StatusReport:
    """Builds this node's status: identity, health, and every open connection.

    With 10,000 streams the document is megabytes, so what the web and the admin
    report get (L{encoded}, L{page}) is built at most once per L{CACHE_SECONDS
    <emojistream.cache.CACHE_SECONDS>}, the same bytes going to every request in
    between, and built L{SLICE} connections per reactor turn (with C{turns}, the
    reactor; see L{emojistream.slices}), so that no stream's delivery waits behind the
    whole of it.
    """

    def __init__(self, hub: Hub, feed: HasState, *, node: str, clock: IReactorTime,
                 counters: Callable[[], Mapping[str, float]] = dict,
                 turns: IReactorTime | None = None,
                 more: Callable[[], Mapping[str, Any]] = dict) -> None:
        """@param more: further fields of the head (the source and what it reports)."""
        self._hub = hub
        self._more = more
        self._feed = feed
        self._node = node
        self._clock = clock
        self._slices = None if turns is None else slice_per_turn(turns)
        self._counters = counters
        self._rates = RateMeter()
        self._cached: _Built | None = None
        self._waiting: Waiters[None] = Waiters()
        self._building = False
        self._cached_state = ""
        #: Documents built for the web since start (not counting cache hits).
        self.builds = 0

    def _current(self) -> Deferred[None]:
        """Fires once C{_cached} is fresh (at once if it is)."""
        now = self._clock.seconds()
        cached = self._cached
        # A change of the Redis state shows at once (status is "OK" only while up).
        if cached is not None and fresh(cached.at, now) \
                and self._cached_state == self._feed.state:
            return succeed(None)
        d = self._waiting.wait()
        if self._building:
            return d
        self._building = True
        self._cached_state = self._feed.state
        streams = sorted(self._hub.streams(), key=lambda s: s.created_at)
        head = self._head(now)
        done: list[bytes] = []

        def encode(some: Sequence[Stream]) -> None:
            done.extend(stream.describe_json(now) for stream in some)

        def built(_: object) -> None:
            self.builds += 1
            self._cached = _Built(now, head, done,
                                  head + b',"connections":[' + b",".join(done) + b"]}",
                                  [(s.request_path, s.client_ip) for s in streams])
            self._building = False
            self._waiting.fire(None)

        def failed(reason: Failure) -> None:
            self._building = False
            self._waiting.fail(reason)

        # At once without turns (or with few streams); a failure fails the waiters
        # rather than leave them, and every later request, waiting for ever.
        maybeDeferred(each_slice, streams, SLICE, encode, self._slices).addCallbacks(
            built, failed)
        return d

    def _head(self, now: float) -> bytes:
        """The document without its connections, as JSON lacking the closing brace."""
        document = self.document(now, connections=False)
        return json.dumps(document, separators=(",", ":")).encode()[:-1]

    def encoded(self) -> Deferred[bytes]:
        """The whole document as compact JSON, at most a second old (also what the
        admin report writes to Redis)."""
        return self._current().addCallback(lambda _: self._fresh().whole)

    def summary(self) -> Deferred[bytes]:
        """The document without its connections, with C{connections_total} (how many):
        what the cluster view needs of this node."""

        def summarized(_: object) -> bytes:
            built = self._fresh()
            return b'%s,"connections_total":%d}' % (built.head, len(built.connections))

        return self._current().addCallback(summarized)

    def page(self, offset: int, limit: int, path: str = "", client_ip: str = ""
             ) -> Deferred[bytes]:
        """The document with only connections C{offset} to C{offset + limit} (oldest
        first) of those whose request path starts with C{path} and whose client is
        C{client_ip} (when given), and C{connections_total}, how many match: for a page
        that shows a few at a time."""

        def paged(_: object) -> bytes:
            built = self._fresh()
            connections = built.connections
            if path or client_ip:
                connections = [
                    c for c, (p, ip) in zip(connections, built.keys, strict=True)
                    if p.startswith(path) and (not client_ip or ip == client_ip)]
            return b'%s,"connections_total":%d,"offset":%d,"connections":[%s]}' % (
                built.head, len(connections), offset,
                b",".join(connections[offset:offset + limit]))

        return self._current().addCallback(paged)

    @property
    def size(self) -> int:
        """Bytes of the whole document as last built (0 before the first)."""
        return len(self._cached.whole) if self._cached is not None else 0

    def _fresh(self) -> _Built:
        assert self._cached is not None
        return self._cached

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
        }
        document.update(self._more())
        document["totals"] = totals = dict(self._counters())
        document["rates"] = self._rates.sample(now, totals)
        if connections:
            document["connections"] = self._hub.snapshot(now)
        return document
