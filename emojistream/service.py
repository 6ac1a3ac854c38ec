"""Service wiring: settings in, one running daemon's service tree out.

Shared by the twistd plugin (L{emojistream.tap}) and C{emojistream.tac}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.web.server import Site

from emojistream.config import Settings
from emojistream.demo import EmbeddedRedis, Feeder, find_redis_server, free_port
from emojistream.hub import Hub
from emojistream.redisfeed import RedisFeed
from emojistream.router import DETAIL_PATTERN, SCORE_CHANNEL, Router
from emojistream.sse import KEEPALIVE, encode_event
from emojistream.status import StatusReport
from emojistream.summarizer import RATE, ScoreSummarizer
from emojistream.web import StreamRoutes


class _QuietSite(Site):
    """A Site without the per-request access log: with thousands of long-lived
    streams it would drown the daemon's own log (C{--verbose} logs streams)."""

    def log(self, request: Any) -> None:
        pass


class _RecordingEndpoint:
    """A server endpoint that remembers the port it ends up listening on."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint
        self._waiting: list[Deferred[IListeningPort]] = []
        self.port: IListeningPort | None = None

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = self._endpoint.listen(factory)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.callback(port)
            return port

        return d.addCallback(listening)

    def when_listening(self) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = Deferred()
        if self.port is not None:
            d.callback(self.port)
        else:
            self._waiting.append(d)
        return d


class Emojistream:
    """The assembled daemon: its parts, for tests and tools, and its service tree.

    @ivar service: the root C{MultiService} to start.
    """

    def __init__(self, settings: Settings, reactor: Any) -> None:
        self.settings = settings
        self.service = MultiService()
        self.hub = Hub()
        self.summarizer = ScoreSummarizer(
            lambda summary: self.hub.publish("/eps", encode_event(summary))
        )
        self.router = Router(self.hub, self.summarizer, raw_stream=settings.raw_stream)

        redis_address = settings.redis
        redis_parent: MultiService = self.service
        self.embedded_redis: EmbeddedRedis | None = None
        self.feeder: Feeder | None = None
        if settings.demo:
            if not settings.redis_given:
                self.embedded_redis = EmbeddedRedis(reactor, find_redis_server(), free_port())
                self.embedded_redis.setServiceParent(self.service)
                redis_parent = self.embedded_redis
                redis_address = self.embedded_redis.address
            self.feeder = Feeder(redis_address, reactor=reactor, rate=settings.demo_rate)
            self.feeder.setServiceParent(redis_parent)

        self.feed = RedisFeed(
            redis_address, self.router.message, reactor=reactor,
            channels=(SCORE_CHANNEL,), patterns=(DETAIL_PATTERN,),
        )
        self.feed.setServiceParent(redis_parent)

        self._timer(1 / RATE, self.summarizer.tick, reactor)
        self._timer(settings.keepalive, self.hub.keepalive, reactor, KEEPALIVE)

        self.status = StatusReport(self.hub, self.feed, node=settings.node_name, clock=reactor)
        self.routes = StreamRoutes(
            self.hub, self.status.document, clock=reactor,
            raw_stream=settings.raw_stream, verbose=settings.verbose,
        )
        site = _QuietSite(self.routes.resource())
        site.displayTracebacks = False
        self.endpoint = _RecordingEndpoint(serverFromString(reactor, settings.listen))
        web = StreamServerEndpointService(self.endpoint, site)
        # Fail at start-up, not silently, when the port cannot be had.
        web._raiseSynchronously = True
        web.setServiceParent(self.service)

    def _timer(self, interval: float, call: Any, reactor: Any, *args: Any) -> None:
        timer = TimerService(interval, call, *args)
        timer.clock = reactor
        timer.setServiceParent(self.service)

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port once the web service listens."""
        return self.endpoint.when_listening()
