"""HTTP routes: the SSE streams and cleanup (L{StreamRoutes}), the admin status
(L{AdminRoutes}), the health checks (L{Health}), and the one router that serves a
listener's table of them (L{Root}). The HTTP plumbing beneath them (channel,
request, site, connection limits) is L{emojistream.http}'s.

Every response carries C{Access-Control-Allow-Origin: *}; errors are short
plain-text bodies with the right status, never an HTML page or a traceback.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from http import HTTPStatus
from importlib.resources import files
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import RequestRedirect

from emojistream.batching import Batcher
from emojistream.cluster import ClusterUnavailable, ClusterView
from emojistream.config import Settings
from emojistream.http import PerAddressRate, plain_ip
from emojistream.hub import Hub
from emojistream.lifecycle import Drain
from emojistream.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from emojistream.rankings import MAX_LIMIT, Rankings, RankingsUnavailable, parse_limit
from emojistream.replay import Journal, Recall
from emojistream.sse import encode_retry
from emojistream.status import StatusReport
from emojistream.subscription import Refresh, Subscription
from emojistream.vocabulary import (
    DETAIL_NAMESPACE_PREFIX,
    DETAILS_NAMESPACE,
    EPS_NAMESPACE,
    ID_PATTERN,
    ID_RULE,
    KIOSK_NAMESPACE,
    RAW_NAMESPACE,
    SUBSCRIBE,
    Kind,
    detail_namespace,
)
from emojistream.writers import ChunkFramer, writer_for

SSE_HEADERS = (
    (b"Content-Type", b"text/event-stream; charset=utf-8"),
    (b"Cache-Control", b"no-cache"),
    (b"Connection", b"keep-alive"),
    # nginx (at its default proxy_buffering on) passes the stream through at once.
    (b"X-Accel-Buffering", b"no"),
)
CORS = (b"Access-Control-Allow-Origin", b"*")
#: With event IDs, what a script reading a stream with fetch() may see of the headers.
EXPOSE = (b"Access-Control-Expose-Headers", b"X-Sse-Gap")

class _Streaming(Resource):
    """What a stream route answers once its stream has started: rendered by Klein
    as C{NOT_DONE_YET}, so the response stays open until the stream ends it."""

    isLeaf = True

    def render(self, request: IRequest) -> Any:
        return NOT_DONE_YET


STREAMING = _Streaming()

#: Seconds a client turned away for load is asked to wait.
RETRY_AFTER = b"10"


def peer_ip(request: Request) -> str:
    """The address of the peer that sent C{request} (an IPv4 peer of a dual-stack
    socket as IPv4, see L{plain_ip})."""
    return plain_ip(str(getattr(request.getClientAddress(), "host", "")))


class ForwardedFor:
    """The client address a trusted proxy reports, never one the client wrote.

    A proxy appends the address it saw to C{X-Forwarded-For}; anything before that
    came from the client (or from proxies further out) and proves nothing. So the
    address taken is the C{hops}-th from the end: the last one behind one proxy, the
    second to last behind a chain of two, as Werkzeug's ProxyFix and Rack do. With
    a C{header} the proxy sets whole (C{X-Real-IP}), its last value is the one.
    Without the header, or with fewer addresses than hops, it is the peer itself.
    """

    def __init__(self, header: str = "X-Forwarded-For", hops: int = 1) -> None:
        self._header = header.lower().encode("ascii")
        self._hops = hops

    def __call__(self, request: Request) -> str:
        values = request.requestHeaders.getRawHeaders(self._header)
        if values:
            # Repeated header lines are one list, in order.
            addresses = [a.strip() for a in b",".join(values).split(b",")]
            if len(addresses) >= self._hops:
                chosen = addresses[-self._hops]
                if chosen and _ADDRESS.fullmatch(chosen):
                    return plain_ip(chosen.decode("ascii"))
        return peer_ip(request)


def client_ip_of(settings: Settings) -> Callable[[Request], str]:
    """How a request's client address is found with these settings."""
    if settings.trust_proxy:
        return ForwardedFor(settings.client_ip_header, settings.proxy_hops)
    return peer_ip


#: What a proxy writes for an address: IPv4, IPv6 (maybe bracketed), or a name.
_ADDRESS = re.compile(rb"[0-9A-Za-z.:\[\]_-]{1,64}")


def _hang_up(result: object, transport: Any) -> None:
    transport.loseConnection()


def _close_after(request: Request) -> None:
    """End the connection with this response (and say so); over HTTP/2, where the
    connection carries other requests, only the response ends."""
    if request.clientproto.startswith(b"HTTP/2"):
        return
    request.setHeader(b"Connection", b"close")
    request.notifyFinish().addBoth(_hang_up, request.channel.transport)


def _text(request: IRequest, code: int, body: str) -> bytes:
    """A short plain-text answer, with its length (not chunked, whichever code path
    renders it: every error and health answer is framed the same)."""
    # The reason phrase too: Twisted's table lacks some (429 would be "Unknown Status").
    request.setResponseCode(code, HTTPStatus(code).phrase.encode("ascii"))
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    encoded = body.encode("utf-8") + b"\n"
    request.setHeader(b"Content-Length", b"%d" % len(encoded))
    return encoded


def _json_headers(request: IRequest) -> None:
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-cache")


def _json(request: IRequest, document: object) -> bytes:
    _json_headers(request)
    # Compact, as the contract writes it: {"status":"OK","closed":2}.
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _http_error(request: IRequest, failure: Failure) -> bytes:
    """Routing errors (404, 405, redirects) as short text with the right headers."""
    error = failure.value
    assert isinstance(error, HTTPException)
    code = error.code or 500
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        methods = sorted(m for m in error.valid_methods if m != "OPTIONS")
        request.setHeader(b"Allow", ", ".join(methods).encode())
    elif isinstance(error, RequestRedirect):
        # /admin -> /admin/: only the Location (werkzeug's other headers describe its
        # own HTML body, Content-Length included), and relative, so that it holds
        # behind a proxy and whatever Host the client sent.
        target = urlsplit(error.new_url)
        location = target.path + (f"?{target.query}" if target.query else "")
        request.setHeader(b"Location", location.encode("utf-8"))
    return _text(request, code, f"{code} {error.name}")


_log = Logger(namespace="emojistream.web")


def _internal_error(request: IRequest, failure: Failure) -> bytes:
    _log.failure("Error handling {method} {uri}", failure, method=request.method,
                 uri=request.uri)
    return _text(request, 500, "500 Internal Server Error")


#: The methods of a route that reads; HEAD comes with GET (Werkzeug's rule).
GET = ("GET",)
#: The methods of a route that acts.
POST = ("POST",)


@dataclass(frozen=True)
class Route:
    """One entry of a listener's routing table: a Werkzeug rule (its C{<path:...>}
    parts are the handler's keyword arguments), the methods it answers, and the
    handler (the request in, what Klein renders out).

    Every route also answers C{OPTIONS} (a CORS preflight), and any other method with
    405 and C{Allow}. With no C{methods} the path is known but not served with these
    settings (a disabled stream): the handler answers every other method (a 404
    saying why)."""

    rule: str
    methods: tuple[str, ...]
    handler: Callable[..., Any]


def _not_found(why: str = "") -> Callable[[IRequest], bytes]:
    """The handler of a path that is known but not served here: 404, saying why."""
    def answer(request: IRequest) -> bytes:
        return _text(request, 404, f"404 Not Found: {why}" if why else "404 Not Found")
    return answer


def _served(rule: str, handler: Callable[..., Any], served: bool, why: str = "", *,
            guard: Callable[[Callable[[IRequest], bytes]], Callable[[IRequest], bytes]]
            = lambda handler: handler) -> Route:
    """A GET route when C{served}; else the same path answering 404 (C{why}, behind
    C{guard}) to every method but the preflight."""
    if served:
        return Route(rule, GET, handler)
    return Route(rule, (), guard(_not_found(why)))


_BAD_ID = "400 Bad Request: an ID is " + ID_RULE


@dataclass(frozen=True)
class StreamSettings:
    """What the stream routes need of the settings, and nothing else of them."""

    raw_stream: bool
    kiosk_stream: bool
    demo_page: bool
    max_streams: int
    max_streams_per_ip: int
    max_queue: int
    force_refresh: bool
    score_retry_ms: int
    detail_retry_ms: int
    score_max_age: float
    detail_max_age: float
    verbose: bool

    @classmethod
    def of(cls, settings: Settings) -> StreamSettings:
        """These values of C{settings}."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


class StreamRoutes:
    """The streams and cleanup endpoints, and the demo page with its ranking: one
    instance per server, collaborators injected."""

    log = Logger()

    def __init__(self, hub: Hub, settings: StreamSettings, *, clock: IReactorTime,
                 client_ip: Callable[[Request], str] = peer_ip,
                 batcher: Batcher | None = None, drain: Drain | None = None,
                 journal: Journal | None = None, rankings: Rankings | None = None,
                 recall: Recall | None = None) -> None:
        self._hub = hub
        self._rankings = rankings
        self._drain = drain
        self._journal = journal
        #: With a stream source: what a resume beyond the journal's memory reads.
        self._recall = recall
        # One per site: a broadcast's frame is chunked once for all HTTP/1.1 streams.
        self._framer = ChunkFramer()
        self._batcher = batcher
        self._settings = settings
        self._clock = clock
        self._client_ip = client_ip
        self._demo_page = (files("emojistream") / "data" / "demo.html").read_bytes() \
            if settings.demo_page else b""

    def routes(self) -> list[Route]:
        """The stream routes; what these settings leave off answers 404."""
        settings = self._settings
        return [
            Route(SUBSCRIBE + EPS_NAMESPACE, GET, self.eps),
            _served(SUBSCRIBE + RAW_NAMESPACE, self.raw, settings.raw_stream,
                    "the raw stream is disabled here"),
            Route(SUBSCRIBE + DETAILS_NAMESPACE, GET, self.all_details),
            Route(SUBSCRIBE + DETAIL_NAMESPACE_PREFIX + "<path:emoji_id>", GET, self.details),
            _served(SUBSCRIBE + KIOSK_NAMESPACE, self.kiosk, settings.kiosk_stream),
            Route("/subscribe/cleanup/scores", POST, self.cleanup_scores),
            Route("/subscribe/cleanup/details/<path:emoji_id>", POST, self.cleanup_details),
            _served("/", self.index, settings.demo_page),
            _served("/api/rankings", self.rankings, self._rankings is not None),
        ]

    # -- the demo page ----------------------------------------------------------

    def index(self, request: Request) -> bytes:
        """The live emoji grid (C{--demo}, or C{--demo-page}): a page that uses the
        streams as any client would."""
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        return self._demo_page

    def rankings(self, request: Request) -> bytes | Deferred[bytes]:
        """The all-time ranking the demo page starts from (L{emojistream.rankings}),
        served with the page: C{?limit=N} entries, 1 to 1000, all of them by default."""
        assert self._rankings is not None  # routed only then
        _json_headers(request)
        values = request.args.get(b"limit")
        try:
            limit = parse_limit(values[0] if values else None)
        except ValueError:
            request.setResponseCode(400, b"Bad Request")
            return _json(request, {"error": f"limit is a whole number from 1 to {MAX_LIMIT}"})
        # Every answer of the same second comes from one read: caches may keep it that long.
        request.setHeader(b"Cache-Control", b"public, max-age=1")

        def unavailable(failure: Failure) -> bytes:
            failure.trap(RankingsUnavailable)
            request.setResponseCode(503, b"Service Unavailable")
            request.setHeader(b"Retry-After", b"1")
            return _json(request, {"error": str(failure.value)})  # and no-cache

        return self._rankings.top(limit).addErrback(unavailable)

    # -- streams -----------------------------------------------------------

    def eps(self, request: Request) -> Any:
        return self._stream(request, EPS_NAMESPACE, Kind.EPS)

    def raw(self, request: Request) -> Any:
        return self._stream(request, RAW_NAMESPACE, Kind.RAW)

    def all_details(self, request: Request) -> Any:
        return self._stream(request, DETAILS_NAMESPACE, Kind.DETAIL)

    def details(self, request: Request, emoji_id: str) -> Any:
        if not ID_PATTERN.fullmatch(emoji_id):
            return _text(request, 400, _BAD_ID)
        return self._stream(request, detail_namespace(emoji_id), Kind.DETAIL, tag=emoji_id)

    def kiosk(self, request: Request) -> Any:
        return self._stream(request, KIOSK_NAMESPACE, Kind.KIOSK)

    def _stream(self, request: Request, namespace: str, kind: Kind,
                tag: str | None = None) -> Any:
        settings = self._settings
        if request.method == b"HEAD":
            self._stream_headers(request)
            return b""
        if self._drain is not None and self._drain.draining:
            # Shutting down: the client is to come back in a while, to another node
            # (on an open keep-alive connection; listening has already stopped).
            self._stream_headers(request)
            _close_after(request)
            return encode_retry(self._drain.retry_hint())
        # Limits come before any per-stream state exists; a refused client's
        # connection is closed too, so that it holds no descriptor either.
        if len(self._hub) >= settings.max_streams:
            request.setHeader(b"Retry-After", RETRY_AFTER)
            _close_after(request)
            return _text(request, 503, "503 Service Unavailable: too many streams, "
                                       "try again later")
        client_ip = self._client_ip(request)
        if settings.max_streams_per_ip and self._hub.from_ip(client_ip) >= \
                settings.max_streams_per_ip:
            request.setHeader(b"Retry-After", RETRY_AFTER)
            _close_after(request)
            return _text(request, 429, "429 Too Many Requests: too many streams from "
                                       "this address")
        # Admitted: from here on the subscription owns the stream (resume, hub,
        # expiry, start, end, log). The headers are set first, so that they go out
        # with its response head.
        self._stream_headers(request)
        writer = writer_for(kind, request, max_queue=settings.max_queue,
                            batcher=self._batcher, framer=self._framer)
        subscription = Subscription(
            writer, hub=self._hub, clock=self._clock, namespace=namespace, kind=kind,
            client_ip=client_ip, tag=tag, max_queue=settings.max_queue,
            log=self.log if settings.verbose else None)
        subscription.start(self._journal, Refresh(
            settings.score_max_age, settings.detail_max_age, settings.score_retry_ms,
            settings.detail_retry_ms) if settings.force_refresh else None, self._recall)
        return STREAMING

    def _stream_headers(self, request: Request) -> None:
        for name, value in SSE_HEADERS:
            request.setHeader(name, value)
        if request.clientproto.startswith(b"HTTP/2"):
            # HTTP/2 forbids connection-specific headers.
            request.responseHeaders.removeHeader(b"Connection")
        elif not getattr(request.channel, "persistent", True):
            # HTTP/1.0, or "Connection: close": the connection ends with the response.
            request.setHeader(b"Connection", b"close")
        if self._settings.force_refresh:
            request.setHeader(b"X-Sse-Cleanup-Requested", b"true")
        if self._journal is not None:
            request.setHeader(*EXPOSE)

    # -- cleanup -------------------------------------------------------------

    def cleanup_scores(self, request: Request) -> bytes:
        closed = self._close_callers(request, (EPS_NAMESPACE, RAW_NAMESPACE))
        return _json(request, {"status": "OK", "closed": closed})

    def cleanup_details(self, request: Request, emoji_id: str) -> bytes:
        if not ID_PATTERN.fullmatch(emoji_id):
            return _text(request, 400, _BAD_ID)
        closed = self._close_callers(request, (detail_namespace(emoji_id),))
        return _json(request, {"status": "OK", "closed": closed})

    def _close_callers(self, request: Request, namespaces: tuple[str, ...]) -> int:
        """Close the streams of C{namespaces} opened from the caller's IP; how many."""
        ip = self._client_ip(request)
        mine = [s for ns in namespaces for s in self._hub.in_namespace(ns) if s.client_ip == ip]
        for stream in mine:
            stream.close()
        if self._settings.verbose and mine:
            self.log.info("cleanup closed {n} stream(s) of {ip}", n=len(mine), ip=ip)
        return len(mine)


class AdminRoutes:
    """C{/admin/}: the status page, C{status.json}, C{cluster.json} and C{/metrics},
    optionally behind a bearer token.

    C{status.json} serves the status built at most once a second; C{?limit=N}
    (with C{&offset=M}, and C{&path=} a request path prefix, C{&client_ip=}) lists
    only that page of the connections, as the page does.
    The whole document, once it is big, goes to one address at most
    L{WHOLE_PER_SECOND} times a second.
    """

    #: Whole status documents one address may fetch per second, once they are big.
    WHOLE_PER_SECOND = 2
    #: Bytes from which the whole document counts as big (about 1,500 connections).
    BIG_DOCUMENT = 256 * 1024

    def __init__(self, status: StatusReport, token: str = "", *,
                 whole_rate: PerAddressRate | None = None,
                 client_ip: Callable[[Request], str] = peer_ip,
                 metrics: Callable[[], bytes] | None = None,
                 cluster: ClusterView | None = None) -> None:
        self._status = status
        self._metrics = metrics
        self._cluster = cluster
        self._token = token.encode("ascii")
        self._whole_rate = whole_rate
        self._client_ip = client_ip
        self._page = (files("emojistream") / "data" / "admin.html").read_bytes()

    def routes(self) -> list[Route]:
        """The admin routes, wherever they are served (the main listener, or the
        C{--admin-listen} one alone)."""
        return [
            Route("/admin/", GET, self.page),
            Route("/admin/status.json", GET, self.status_json),
            _served("/admin/cluster.json", self.cluster_json, self._cluster is not None,
                    "the cluster view comes with --admin-report", guard=self._guard),
            _served("/metrics", self.metrics, self._metrics is not None, guard=self._guard),
        ]

    def _guard(self, handler: Callable[[IRequest], bytes]) -> Callable[[IRequest], bytes]:
        """C{handler} behind the token: a path left off is so only for those who may
        see what it would serve."""
        def answer(request: IRequest) -> bytes:
            return handler(request) if self._authorized(request) else self._refuse(request)
        return answer

    def _authorized(self, request: IRequest) -> bool:
        if not self._token:
            return True
        given = request.getHeader(b"authorization") or b""
        scheme, _, credentials = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(),
                                                                   self._token)

    def _refuse(self, request: IRequest) -> bytes:
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="emojistream admin"')
        return _text(request, 401, "401 Unauthorized: a bearer token is required")

    def status_json(self, request: Request) -> bytes | Deferred[bytes]:
        if not self._authorized(request):
            return self._refuse(request)
        args = request.args
        _json_headers(request)
        if b"limit" not in args and b"offset" not in args:
            # The whole document is megabytes with thousands of streams; it changes
            # once a second, so a client gets a big one a few times a second at most.
            if self._whole_rate is not None \
                    and self._status.size >= self.BIG_DOCUMENT \
                    and not self._whole_rate.allow(self._client_ip(request)):
                request.setHeader(b"Retry-After", b"1")
                return _text(request, 429, "429 Too Many Requests: the whole status "
                                           "changes once a second; use ?limit= for pages")
            return self._status.encoded()
        try:
            limit = _count_arg(args, b"limit", 100)
            offset = _count_arg(args, b"offset", 0)
            path, client_ip = _text_arg(args, b"path"), _text_arg(args, b"client_ip")
        except ValueError:
            return _text(request, 400, "400 Bad Request: limit and offset are whole numbers, "
                                       "path and client_ip UTF-8 text")
        return self._status.page(offset, min(limit, 10_000), path, plain_ip(client_ip))

    def cluster_json(self, request: Request) -> bytes | Deferred[bytes]:
        """Every node reporting into C{admin_stream_status} (L{emojistream.cluster})."""
        if not self._authorized(request):
            return self._refuse(request)
        assert self._cluster is not None  # routed only then
        _json_headers(request)

        def unavailable(failure: Failure) -> bytes:
            failure.trap(ClusterUnavailable)
            request.setHeader(b"Retry-After", b"5")
            return _text(request, 503, f"503 Service Unavailable: {failure.value}")

        return self._cluster.encoded().addErrback(unavailable)

    def metrics(self, request: Request) -> bytes:
        """Prometheus text exposition (L{emojistream.metrics})."""
        if not self._authorized(request):
            return self._refuse(request)
        assert self._metrics is not None  # routed only then
        request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE)
        request.setHeader(b"Cache-Control", b"no-cache")
        return self._metrics()

    def page(self, request: Request) -> bytes:
        # The page itself holds no data; its script sends the token for status.json.
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return self._page


def _text_arg(args: dict[bytes, list[bytes]], name: bytes) -> str:
    """A query parameter as text (empty when absent)."""
    values = args.get(name)
    return values[0].decode("utf-8") if values else ""


def _count_arg(args: dict[bytes, list[bytes]], name: bytes, default: int) -> int:
    """A query parameter that is a whole number, zero or more."""
    values = args.get(name)
    if not values:
        return default
    value = int(values[0])
    if value < 0:
        raise ValueError(name)
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOST = re.compile(rb"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]*")
_TOKEN = rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_TOKEN_LIST = re.compile(_TOKEN + rb"(?:[ \t]*,[ \t]*" + _TOKEN + rb")*")

#: What a cross-origin page may send, for preflights that do not say.
_ALLOWED_HEADERS = b"Authorization, Content-Type, Last-Event-ID, Cache-Control"
#: Seconds a browser may cache a preflight's answer.
PREFLIGHT_MAX_AGE = b"86400"


def _valid_host(host: bytes | None) -> bool:
    """A Host header is absent (HTTP/1.0) or a host[:port] (RFC 3986 reg-name or IP)."""
    return host is None or bool(_HOST.fullmatch(host.strip()))


def _preflight(request: IRequest) -> bytes:
    """A CORS preflight: any origin may GET, HEAD and POST here with the headers it
    asks for (nothing here depends on cookies, so nothing is exposed by allowing it)."""
    request.setResponseCode(204)
    request.setHeader(b"Access-Control-Allow-Methods", b"GET, HEAD, POST, OPTIONS")
    wanted = (request.getHeader(b"access-control-request-headers") or b"").strip()
    request.setHeader(b"Access-Control-Allow-Headers",
                      wanted if _TOKEN_LIST.fullmatch(wanted) else _ALLOWED_HEADERS)
    request.setHeader(b"Access-Control-Max-Age", PREFLIGHT_MAX_AGE)
    request.setHeader(b"Content-Length", b"0")
    return b""


class Health:
    """C{/health/live} and C{/health/ready}, for balancers and orchestrators: tiny
    bodies, no token, on the port they balance.

    Live answers 200 whenever it answers at all (the reactor is turning); ready
    answers 200 while the daemon is subscribed to Redis, 503 at once otherwise.
    """

    def __init__(self, subscribed: Callable[[], bool]) -> None:
        self._subscribed = subscribed

    def routes(self) -> list[Route]:
        """The two checks."""
        return [Route("/health/live", GET, self.live), Route("/health/ready", GET, self.ready)]

    def live(self, request: IRequest) -> bytes:
        request.setHeader(b"Cache-Control", b"no-cache")
        return _text(request, 200, "OK")

    def ready(self, request: IRequest) -> bytes:
        request.setHeader(b"Cache-Control", b"no-cache")
        if self._subscribed():
            return _text(request, 200, "OK")
        return _text(request, 503, "503 Service Unavailable: not subscribed to Redis")


class Root(Resource):
    """Every request's entry on one listener, and its one router: sets the CORS
    header, turns away what no route could take (a path that is not UTF-8 or holds
    control characters, a malformed Host), then finds the route in the listener's
    table, one Klein app built from it.

    The same answers on every path: a route's method runs its handler, OPTIONS is a
    CORS preflight (204), another method is 405 with C{Allow}; a path in no route
    (on this listener) is 404 whatever the method; C{/admin} redirects to C{/admin/}
    (Werkzeug's rule)."""

    isLeaf = True

    def __init__(self, routes: Iterable[Route]) -> None:
        super().__init__()
        app = Klein()
        rules = set()
        for route in routes:
            if route.rule in rules:
                raise ValueError(f"{route.rule!r} is routed twice")
            rules.add(route.rule)
            methods = [*route.methods, "OPTIONS"] if route.methods else None
            app.route(route.rule, methods=methods, endpoint=route.rule)(
                _answering_preflights(route))
        app.handle_errors(HTTPException)(_http_error)
        app.handle_errors(Exception)(_internal_error)
        #: The rules this listener serves.
        self.rules = frozenset(rules)
        self._app = app.resource()

    def render(self, request: IRequest) -> Any:
        request.setHeader(*CORS)
        path = request.path
        try:
            decoded = unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            return _text(request, 400, "400 Bad Request: the path is not UTF-8")
        if _CONTROL.search(decoded):
            return _text(request, 400, "400 Bad Request: the path holds control characters")
        if not _valid_host(request.getHeader(b"host")):
            return _text(request, 400, "400 Bad Request: the Host header is not valid")
        return self._app.render(request)


def _answering_preflights(route: Route) -> Callable[..., Any]:
    """C{route}'s handler, with C{OPTIONS} answered as a CORS preflight."""
    handler = route.handler

    def handle(request: IRequest, **arguments: Any) -> Any:
        if request.method == b"OPTIONS":
            return _preflight(request)
        return handler(request, **arguments)
    return handle
