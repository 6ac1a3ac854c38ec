"""Service wiring: settings in, one running daemon's service tree out.

Shared by the twistd plugin (L{emojistream.tap}) and C{emojistream.tac}.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger

from emojistream.batching import ADAPTIVE, BATCH, Batcher, Coalescing
from emojistream.cluster import ClusterView
from emojistream.compat import FailingEndpointService
from emojistream.config import RedisAddress, Settings
from emojistream.delays import Delays, DeliveryDelays
from emojistream.demo import EmbeddedRedis, Feeder, load_rankings
from emojistream.endpoints import with_backlog
from emojistream.http import ConnectionGate, PerAddressRate, QuietSite
from emojistream.hub import KEEPALIVE_TICKS, Hub
from emojistream.lifecycle import (
    Drain,
    ExitOnStartupError,
    OrderedStop,
    ProcessLimits,
    Signals,
    StartupError,
)
from emojistream.metrics import Metrics, MetricSources
from emojistream.notify import Notifier
from emojistream.rankings import Rankings
from emojistream.redisconn import RedisConnection
from emojistream.redisfeed import REPLICA_CHECK, RedisFeed, ReplicaWatch
from emojistream.replay import RECALL_ENTRIES, Journal, Recall
from emojistream.reporting import (
    ADMIN_INTERVAL,
    AdminReporter,
    CarbonReporter,
    TcpCarbon,
    UdpCarbon,
    carbon_prefix,
)
from emojistream.router import Router, hit_of
from emojistream.sse import KEEPALIVE
from emojistream.status import StatusReport
from emojistream.streamfeed import WATCH_INTERVAL, StreamFeed, StreamWatch
from emojistream.streamhistory import RedisHistory
from emojistream.summarizer import RATE, ScoreSummarizer, Ticker
from emojistream.timers import SafeCall
from emojistream.tls import harden
from emojistream.vocabulary import (
    DETAIL_PATTERN,
    EPS_NAMESPACE,
    KIOSK_PATTERN,
    POOLS,
    SCORE_CHANNEL,
    Kind,
)
from emojistream.waiting import Waiters
from emojistream.web import (
    AdminRoutes,
    Health,
    Root,
    StreamRoutes,
    StreamSettings,
    client_ip_of,
)
from emojistream.workers import ParentLink, worker_number

_log = Logger()


class _RecordingEndpoint:
    """A server endpoint that remembers (and logs) the port it ends up listening on."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, gate: ConnectionGate) -> None:
        self._endpoint = endpoint
        self._gate = gate
        self._waiting: Waiters[IListeningPort] = Waiters()
        self.port: IListeningPort | None = None

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        d: Deferred[IListeningPort] = self._endpoint.listen(factory)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            self._gate.add_port(port)
            address: Any = port.getHost()
            if hasattr(address, "port"):
                host = str(address.host)
                # An IPv6 address in brackets ([::]:8001), as in a URL.
                where = f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
            else:
                where = str(getattr(address, "name", address))
            self.log.info("Serving HTTP on {where}", where=where)
            self._waiting.fire(port)
            return port

        return d.addCallback(listening)

    def when_listening(self) -> Deferred[IListeningPort]:
        if self.port is not None:
            return succeed(self.port)
        return self._waiting.wait()


class _Listener(FailingEndpointService):
    """Listens on an endpoint at start-up; a port that cannot be had (in use, no
    such address or directory) stops the start with a L{StartupError}."""

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self._description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise StartupError(f"cannot listen on {self._description!r}: "
                               f"{why or type(e).__name__}") from None


class Emojistream:
    """The assembled daemon: its parts, for tests and tools, and its service tree.

    @param reactor: does the networking.
    @param clock: keeps time for every timer (ticks, keepalives, forced closes,
        reports); the reactor unless a test passes a C{Clock}.
    @param worker: its number, when a C{--workers} parent started it (a label on its
        metrics).
    @ivar service: the root service to start. It stops in order: listeners first,
        then the drain of open streams, then Redis and the timers.
    """

    def __init__(self, settings: Settings, reactor: Any, clock: Any = None,
                 worker: int | None = None) -> None:
        clock = reactor if clock is None else clock
        self.settings = settings
        self.worker = worker
        self.service = OrderedStop()
        self.core = MultiService()
        self.core.setServiceParent(self.service)

        # A message's way (docs/ARCHITECTURE.md): a Redis read → the router → the hub's
        # namespace index → each stream's writer → the socket.
        # The write policy: under the adaptive one, the hub has the streams that hear
        # many messages a tick coalesce them into one write per tick.
        self.hub = Hub(reactor, coalescing=(
            Coalescing() if settings.write_policy == ADAPTIVE else None))
        # With --event-ids every event gets its ID, and is kept for resuming clients.
        self.journal: Journal | None = None
        streams = settings.source == "streams"
        if settings.event_ids or streams:
            # From a stream source, the IDs are the stream's: its epoch and entry IDs.
            self.journal = Journal(clock, max_events=settings.replay_events,
                                   max_age=settings.replay_age,
                                   max_bytes=settings.replay_bytes, positions=streams)
        self.summarizer = ScoreSummarizer(
            lambda counts, frame: self.hub.publish_summary(EPS_NAMESPACE, frame, counts),
            **({} if self.journal is None else {"encode": self.journal.summary}))
        # What one read from Redis brings leaves in one write per client at its end; a
        # stream that coalesces holds everything for the tick (with --write-policy
        # batch, every stream).
        self.batcher = Batcher(hold_all=settings.write_policy == BATCH)
        self.delays = DeliveryDelays()
        self.router = Router(self.hub, self.summarizer, raw_stream=settings.raw_stream,
                             kiosk_stream=settings.kiosk_stream,
                             max_payload=settings.max_payload, batcher=self.batcher,
                             journal=self.journal, clock=reactor, delays=self.delays)
        redis_address, redis_parent = self._redis(reactor)
        patterns = (DETAIL_PATTERN, KIOSK_PATTERN) if settings.kiosk_stream else (DETAIL_PATTERN,)
        self.feed: RedisFeed | StreamFeed
        if streams:
            self.feed = StreamFeed(redis_address, self.router, reactor=reactor,
                                   stream_key=settings.stream_key, **self._redis_connect)
        else:
            self.feed = RedisFeed(redis_address, self.router, reactor=reactor,
                                  channels=(SCORE_CHANNEL,), patterns=patterns,
                                  **self._redis_connect)
        self.feed.setServiceParent(redis_parent)
        # Subscribed to a replica cut off from its primary, nothing arrives: readiness
        # and status ask Redis (over a command connection, shared with the admin
        # report) every 2 s.
        self.commands = RedisConnection(redis_address, reactor=reactor, purpose="command",
                                        **self._redis_connect)
        self.commands.setServiceParent(redis_parent)
        self.redis = ReplicaWatch(self.feed, self.commands, clock=clock)
        # With a stream source: what operators see of it (length, lag, the bridge's
        # lease), and what a resume reads from it when memory cannot fill it.
        self.stream_watch: StreamWatch | None = None
        self.history: RedisHistory | None = None
        self.recall: Recall | None = None
        if isinstance(self.feed, StreamFeed):
            self.stream_watch = StreamWatch(self.feed, self.commands, clock=clock)
            self.history = RedisHistory(self.commands, settings.stream_key, clock=reactor)
            assert self.journal is not None  # a stream source turns event IDs on
            self.recall = Recall(self.history, self.journal, event_of=self.router.event_of,
                                 hit_of=hit_of, max_entries=RECALL_ENTRIES)
        self.rankings = self._rankings(clock)

        # Time: the score tick, and keepalives to idle streams.
        self.tick_lags = Delays()
        self.ticker = Ticker(1 / RATE, self._tick, clock, lateness=self.tick_lags.observe)
        self.ticker.setServiceParent(self.core)
        self._timer(settings.keepalive / KEEPALIVE_TICKS, self.hub.keepalive, clock,
                    "Keepalive", KEEPALIVE)
        self._timer(REPLICA_CHECK, self.redis.check, clock, "Replication check")
        if self.stream_watch is not None:
            self._timer(WATCH_INTERVAL, self.stream_watch.check, clock, "Stream check")

        # Every listener's connections count together against the open-file limit
        # (which the daemon's ProcessLimits tells it when it starts).
        self.gate = ConnectionGate(per_ip=settings.max_connections_per_ip, clock=clock)

        # The whole status document, megabytes with thousands of streams, goes to one
        # address a few times a second at most.
        self.whole_status_rate = PerAddressRate(AdminRoutes.WHOLE_PER_SECOND, 1.0, clock)

        # What the daemon says of itself: status, the admin cluster's hash, graphite.
        self.status = StatusReport(self.hub, self.redis, node=settings.node_name, clock=clock,
                                   counters=self._counters, turns=reactor,
                                   more=self._source_status)
        self.admin_reporter = self._admin_report(reactor, clock, redis_address, redis_parent)
        self.metrics = Metrics(MetricSources(
            pools=self.hub.pool_sizes, counters=self._counters,
            redis_state=lambda: self.feed.state,
            tick_lags=self.tick_lags, delays=self.delays, replay=self.journal,
            source=settings.source,
            stream=None if self.stream_watch is None else self.stream_watch.figures,
            replay_fetches=None if self.history is None else self._fetches),
            labels=None if worker is None else {"worker": str(worker)})
        self.carbon: TcpCarbon | UdpCarbon | None = None
        self._carbon(reactor, clock)

        # Stopping drains the streams; the web goes first (it stops in reverse order).
        self.drain = Drain(self.hub, clock=clock, period=settings.drain)
        self.drain.setServiceParent(self.service)
        if self.admin_reporter is not None:
            # Stopped once the listeners have closed, before the stop is announced and
            # the drain begins: this node leaves the hashes before a --workers parent
            # starts its replacement, which reports under the same name.
            self.admin_reporter.setServiceParent(self.service)
        #: Who is told of the stop (systemd, a --workers parent): stopped once the
        #: listeners have closed and before the drain, so that a parent may start a
        #: replacement on the same ports at once.
        self.announce = MultiService()
        self.announce.setServiceParent(self.service)
        self._web(reactor, clock)

    def _redis(self, reactor: Any) -> tuple[RedisAddress, MultiService]:
        """Where Redis is, and the service its clients run under: in demo mode an
        embedded redis-server (its clients start once it accepts) and the feeder."""
        settings = self.settings
        self.embedded_redis: EmbeddedRedis | None = None
        self.feeder: Feeder | None = None
        #: How every client of this Redis connects (the embedded one's port is picked
        #: when it starts).
        self._redis_connect: dict[str, Any] = {}
        address, parent = settings.redis, self.core
        if settings.demo:
            if not settings.redis_given:
                self.embedded_redis = EmbeddedRedis(reactor)
                self.embedded_redis.setServiceParent(self.core)
                parent = self.embedded_redis
                self._redis_connect = {"endpoint": self.embedded_redis.endpoint,
                                       "where": EmbeddedRedis.DESCRIPTION}
            if self.worker in (None, 1):
                # One feeder per tree (worker 1's), or --workers N would feed N times
                # --demo-rate. The embedded Redis starts empty: it seeds the scores.
                self.feeder = Feeder(address, reactor=reactor, rate=settings.demo_rate,
                                     seed=self.embedded_redis is not None,
                                     stream_key=(settings.stream_key
                                                 if settings.source == "streams" else None),
                                     **self._redis_connect)
                self.feeder.setServiceParent(parent)
        return address, parent

    def _rankings(self, clock: Any) -> Rankings | None:
        """With the demo page: the all-time ranking it starts from, read over the
        command connection (the subscriber's cannot send commands)."""
        if not self.settings.demo_page:
            return None
        return Rankings(self.commands, clock=clock,
                        known={e.id: (e.char, e.name) for e in load_rankings()})

    def _admin_report(self, reactor: Any, clock: Any, redis_address: RedisAddress,
                      redis_parent: MultiService) -> AdminReporter | None:
        """With --admin-report: this node's status into Redis every 5 s, and the
        cluster view (every node's report) over the same connection."""
        settings = self.settings
        self.cluster: ClusterView | None = None
        if not settings.admin_report:
            return None
        connection = self.commands
        if settings.admin_redis is not None and (settings.admin_redis != redis_address
                                                 or self.embedded_redis is not None):
            connection = RedisConnection(settings.admin_redis, reactor=reactor,
                                         purpose="admin report")
            connection.setServiceParent(redis_parent)
        self.cluster = ClusterView(connection, clock=clock)
        reporter = AdminReporter(connection, self.status.encoded, settings.node_name,
                                 summary=self.status.summary, clock=clock)
        self._timer(ADMIN_INTERVAL, reporter.report, clock, "Admin report")
        return reporter

    def _carbon(self, reactor: Any, clock: Any) -> None:
        """With --graphite: pool sizes and counters to carbon every interval."""
        settings = self.settings
        if settings.graphite is None:
            return
        carbon_type = TcpCarbon if settings.graphite.transport == "tcp" else UdpCarbon
        self.carbon = carbon = carbon_type(settings.graphite, reactor=reactor)
        carbon.setServiceParent(self.core)
        reporter = CarbonReporter(
            carbon.send, prefix=carbon_prefix(settings.graphite_prefix, settings.node_name),
            clock=clock, gauges=self._gauges, counters=self._counters)
        self._timer(settings.graphite_interval, reporter.report, clock, "Carbon report")

    def _web(self, reactor: Any, clock: Any) -> None:
        """The routes, on the main endpoint (and the admin ones on their own, if asked)."""
        settings = self.settings
        self.web = MultiService()
        self.web.setServiceParent(self.service)
        #: The HTTP sites, main then admin (tests drive them in memory).
        self.sites: list[QuietSite] = []
        client_ip = client_ip_of(settings)
        streams = StreamRoutes(self.hub, StreamSettings.of(settings), clock=clock,
                               client_ip=client_ip, batcher=self.batcher, drain=self.drain,
                               journal=self.journal, rankings=self.rankings,
                               recall=self.recall)
        admin = AdminRoutes(
            self.status, settings.admin_token,
            whole_rate=self.whole_status_rate,
            client_ip=client_ip, metrics=self.metrics.exposition,
            cluster=self.cluster)
        health = Health(lambda: self.redis.state == "up")
        # The admin routes are on the main listener, or on their own alone.
        main = [*streams.routes(), *health.routes()]
        self.endpoint = self._listen(
            reactor, settings.listen,
            Root(main if settings.admin_listen else [*main, *admin.routes()]))
        self.admin_endpoint: _RecordingEndpoint | None = None
        if settings.admin_listen:
            self.admin_endpoint = self._listen(reactor, settings.admin_listen,
                                               Root(admin.routes()))

    def _listen(self, reactor: Any, description: str, root: Root) -> _RecordingEndpoint:
        site = QuietSite(root, send_buffer=self.settings.send_buffer,
                         request_timeout=self.settings.request_timeout, gate=self.gate,
                         reactor=reactor)
        # An ssl: endpoint gets this daemon's TLS (ciphers, TLS 1.2+, ALPN: emojistream.tls).
        endpoint = _RecordingEndpoint(
            harden(reactor, serverFromString(reactor, with_backlog(description)),
                   self.settings.tls_ciphers, site.acceptableProtocols()), self.gate)
        self.sites.append(site)
        listener = _Listener(description, endpoint, site)
        listener.setServiceParent(self.web)
        return endpoint

    def _timer(self, interval: float, call: Callable[..., object], clock: Any, what: str,
               *args: Any) -> IService:
        timer = TimerService(interval, SafeCall(call, what), *args)
        timer.clock = clock
        timer.setServiceParent(self.core)
        return timer

    def _tick(self) -> None:
        """Every 1/60 s: what coalescing streams held (before the summary's slices,
        which take a few milliseconds to write), the score summary (with
        --write-policy batch, its first slice too), then, every window of ticks,
        which streams coalesce."""
        self.batcher.flush()
        self.summarizer.tick()
        if self.batcher.hold_all:
            self.batcher.flush()
        self.hub.pace()

    def _gauges(self) -> dict[str, float]:
        sizes = self.hub.pool_sizes()
        pools = [p for p in POOLS if p is not Kind.KIOSK or self.settings.kiosk_stream]
        return {f"stream.{pool}.clients": sizes[pool] for pool in pools}

    def _counters(self) -> dict[str, float]:
        messages = self.hub.message_counts()
        return {
            "messages.received": self.router.received,
            "messages.dropped": self.router.dropped,
            "messages.oversized": self.router.oversized,
            "messages.delivered": messages["written"],
            "messages.conflated": messages["conflated"],
            "messages.discarded": messages["discarded"],
            "connections.closed": self.hub.closed,
            "connections.dropped": self.hub.dropped,
            "redis.subscriber_losses": self.feed.losses,
            **self._stream_counters(),
            "connections.refused_per_ip": self.gate.refused_per_ip,
            "connections.accept_pauses": self.gate.accept_pauses,
            "connections.refused_at_limit": self.gate.refused_at_limit,
            "admin.status_refused": self.whole_status_rate.refused,
            **({"carbon.dropped_reports": self.carbon.dropped}
               if isinstance(self.carbon, TcpCarbon) else {}),
        }

    def _source_status(self) -> dict[str, Any]:
        """Status's word on the source: which, and with streams what the stream does
        and the replays served from memory and from Redis."""
        watch = self.stream_watch
        if watch is None:
            return {"source": self.settings.source}
        journal = self.journal
        assert journal is not None
        return {"source": self.settings.source, "stream": watch.figures(),
                "replays": {"memory": journal.hits, "redis": journal.fetched,
                            "gaps": dict(journal.misses), **self._fetches()}}

    def _fetches(self) -> dict[str, int]:
        """What the history reads from Redis for resumes, now and since start."""
        history = self.history
        assert history is not None
        return {"fetching": history.running, "fetch_waiting": history.waiting,
                "fetch_busy": history.busy, "fetch_pages": history.pages}

    def _stream_counters(self) -> dict[str, float]:
        feed = self.feed
        if not isinstance(feed, StreamFeed):
            return {}
        return {"stream.entries_read": feed.entries, "stream.reads": feed.reads,
                "stream.skipped": feed.skipped,
                **{f"stream.gaps.{why}": n for why, n in feed.gaps.items()}}

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port once the web service listens."""
        return self.endpoint.when_listening()

    def summary(self) -> str:
        """One line on how the daemon is doing, for a service manager's status."""
        return f"{len(self.hub)} streams, Redis {self.redis.state}"


def daemon(settings: Settings, reactor: Any, environ: Mapping[str, str] | None = None
           ) -> IService:
    """What twistd runs, through the plugin or the .tac: the process prepared (open
    files, signals), the service tree, and its manager told how it goes: systemd when
    it asks, or the C{--workers} parent that started this process as a worker."""
    environ = os.environ if environ is None else environ
    root = ExitOnStartupError()
    worker = worker_number(environ)
    app = Emojistream(settings, reactor, worker=worker)
    # First, so that signals are handled before anything listens; then the open-file
    # limit, before the listeners and the gate that counts against it.
    Signals(reactor).setServiceParent(root)
    ProcessLimits(reactor, settings.max_streams, app.gate.set_fd_limit).setServiceParent(root)
    app.service.setServiceParent(root)
    notifier: Notifier | None
    if worker is not None:
        link = ParentLink(reactor, lambda: _parent_gone(reactor, app))
        notifier = Notifier(link, clock=reactor, listening=app.when_listening,
                            status=app.summary, watchdog=WORKER_HEARTBEAT)
    else:
        notifier = Notifier.for_systemd(environ, clock=reactor,
                                        listening=app.when_listening, status=app.summary)
    if notifier is not None:
        notifier.setServiceParent(app.announce)
    return root


#: Seconds between a worker's heartbeats to its parent.
WORKER_HEARTBEAT = 0.5
#: Seconds a worker whose parent has gone takes to drain its streams.
ORPHAN_DRAIN = 1.0


def _parent_gone(reactor: Any, app: Emojistream) -> None:
    """A worker's parent has ended: stop at once (the listeners first, so that no
    orphan holds the port) and drain quickly; the alarm ends the process even if the
    stop hangs."""
    _log.warn("The parent process has ended: stopping (streams drained over {s:g} s)",
              s=ORPHAN_DRAIN)
    app.drain.period = min(app.drain.period, ORPHAN_DRAIN)
    signal.alarm(int(ORPHAN_DRAIN) + 10)
    reactor.stop()
