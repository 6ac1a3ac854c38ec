"""Settings from the environment and command-line options, validated in one place.

Environment variables keep the old Ruby deployment's names so that an existing
deployment carries over; every setting also has a twistd option, and an option given
on the command line overrides the environment.
"""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

from emojistream.batching import BATCH, WRITE_POLICIES
from emojistream.endpoints import LISTEN_BACKLOG, listen_address
from emojistream.history import DEFAULT_STREAM_KEY, parse_stream_key
from emojistream.tls import parse_ciphers

PLATFORM = "twisted"


#: The exit status of a start stopped by a setting that cannot work (EX_CONFIG of
#: sysexits.h): the shipped units name it in RestartPreventExitStatus=, so systemd
#: does not restart a daemon that would only fail the same way again.
CONFIG_ERROR_EXIT = 78


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message is one line for the user.

    C{exit_code} is the process's exit status for it: L{CONFIG_ERROR_EXIT}."""

    def __init__(self, message: str, exit_code: int = CONFIG_ERROR_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigExit(SystemExit):
    """Ends the process for a L{ConfigError} with its exit status; C{str()} is the
    line (said on stderr by L{config_exit})."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(code)
        self.line = line

    def __str__(self) -> str:
        return self.line


def config_exit(who: str, error: ConfigError) -> ConfigExit:
    """Say C{error} in one line on stderr; the exception that ends the process with
    its status (C{raise config_exit(...)}). Not a traceback, not twistd's usage text."""
    line = f"{who}: {error}"
    print(line, file=sys.stderr, flush=True)
    return ConfigExit(line, error.exit_code)


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def parse_bool(text: str) -> bool:
    """Read a boolean the way the legacy deployment wrote them (true/t/yes/y/1, any case)."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false, yes/no or 1/0)")


def parse_positive_float(text: str) -> float:
    """A number of seconds greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{text!r} must be a positive number")
    return value


def parse_seconds(text: str, *, least: float) -> float:
    """A number of seconds of at least C{least}: a timer set faster than the daemon can
    use runs in every reactor turn (C{SSE_KEEPALIVE_SEC=1e-7} spun a core), and a
    deadline shorter than a network round trip fails every client."""
    value = parse_positive_float(text)
    if value < least:
        raise ValueError(f"{text!r} is too short: at least {least:g} s")
    return value


def parse_at_most(parse: Callable[[str], Any], most: float, why: str) -> Callable[[str], Any]:
    """C{parse}, then refuse values above C{most} with the reason C{why}."""

    def bounded(text: str) -> Any:
        value = parse(text)
        if value > most:
            raise ValueError(f"{text!r} is too many: at most {most:g} ({why})")
        return value

    return bounded


def parse_positive_int(text: str) -> int:
    """A whole number greater than zero."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return value


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is and how to log in: parsed from a C{redis://} URL."""

    host: str = "localhost"
    port: int = 6379
    password: str | None = field(default=None, repr=False)
    username: str | None = None
    db: int = 0

    def __str__(self) -> str:
        """The address without credentials, for log lines."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"

    def url(self) -> str:
        """The full URL again, credentials included, for handing to a child process."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}"


def parse_redis_url(text: str) -> RedisAddress:
    """Parse C{redis://[[user]:password@]host[:port][/db]}."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{text!r} is not a Redis URL ({e})") from None
    if parts.scheme != "redis":
        raise ValueError(f"{text!r} is not a redis:// URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{text!r}: query strings and fragments are not supported")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"{text!r}: the path must be a database number, like /0")
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if username is not None and password is None:
        # redis://secret@host is how some providers write a bare password.
        username, password = None, username
    return RedisAddress(
        host=parts.hostname or "localhost",
        port=port if port is not None else 6379,
        password=password,
        username=username,
        db=int(path) if path else 0,
    )


def parse_optional_redis_url(text: str) -> RedisAddress | None:
    """A C{redis://} URL, or empty for none."""
    return parse_redis_url(text) if text.strip() else None


@dataclass(frozen=True)
class GraphiteTarget:
    """Where carbon plaintext lines go: C{tcp} (one kept-up connection) or C{udp}."""

    transport: str
    host: str
    port: int = 2003

    def __str__(self) -> str:
        return f"{self.transport}://{self.host}:{self.port}"


def parse_graphite_url(text: str) -> GraphiteTarget | None:
    """Parse C{tcp://host[:port]} or C{udp://host[:port]}; empty means no graphite."""
    if not text.strip():
        return None
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{text!r} is not a graphite URL ({e})") from None
    if parts.scheme not in ("tcp", "udp") or not parts.hostname:
        raise ValueError(f"{text!r} is not a tcp://host:port or udp://host:port URL")
    if parts.path.strip("/") or parts.query or parts.username:
        raise ValueError(f"{text!r}: a graphite URL is only tcp:// or udp:// with host:port")
    return GraphiteTarget(parts.scheme, parts.hostname, port if port is not None else 2003)


_MISSING = re.compile(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.+)")
_NOT_A_NUMBER = re.compile(r"invalid literal for int\(\) with base \d+: (.+)")


def _endpoint_error(e: Exception) -> str:
    """Why Twisted's parser refused an endpoint string, in the operator's words rather
    than the parser's Python (a missing argument, a number that is not one)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    text = str(e)
    missing = _MISSING.search(text)
    if isinstance(e, TypeError) and missing:
        names = re.findall(r"'(\w+)'", missing.group(1))
        return "it needs " + " and ".join(f"{name}=" for name in names)
    not_a_number = _NOT_A_NUMBER.search(text)
    if not_a_number:
        return f"{not_a_number.group(1)} is not a number"
    return text or type(e).__name__


def parse_endpoint(text: str) -> str:
    """A server endpoint string (C{tcp:8001}, C{ssl:...}, C{systemd:...}), checked as
    far as it can be without listening: its syntax, port range, files and, for
    C{systemd:}, that systemd passed the socket.

    Only parsed: no socket is opened and the global reactor is not imported. Whether
    the port can be had is known only when the daemon listens, which says so in one
    line (checking here would be a race, and would fail whenever the port is busy).
    """
    description = text.strip()
    try:
        where = listen_address(description)
    except Exception as e:
        if description.lower().startswith("systemd:") and isinstance(e, IndexError | KeyError):
            raise ValueError(f"{description!r}: {_missing_systemd_socket()}") from None
        raise ValueError(f"{description!r} is not a usable endpoint: "
                         f"{_endpoint_error(e)}") from None
    if description.lower().startswith("unix:"):
        _check_unix_path(description)
    if description.lower().startswith("systemd:"):
        _check_systemd_domain(description)
    if where is not None and not 0 <= where[0] <= 65535:
        raise ValueError(f"{description!r}: port {where[0]} is not between 0 and 65535")
    return description


def _check_systemd_domain(description: str) -> None:
    """The passed socket's address family must be the C{domain=} given: Twisted adopts
    it as told, and an IPv6 socket (a bare C{ListenStream=8001} is one, dual-stack)
    read as IPv4 garbles every client address, so its limits and cleanup too."""
    import os

    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    endpoint = serverFromString(MemoryReactor(), description)

    given = getattr(endpoint, "addressFamily", None)
    fileno = getattr(endpoint, "fileno", None)
    if given not in (socket.AF_INET, socket.AF_INET6) or not isinstance(fileno, int):
        return
    try:
        with socket.socket(fileno=os.dup(fileno)) as passed:
            family = passed.family
    except OSError:
        return
    if family in (socket.AF_INET, socket.AF_INET6) and family != given:
        names = {socket.AF_INET: "INET", socket.AF_INET6: "INET6"}
        why = " (a bare ListenStream= port is)" if family == socket.AF_INET6 else ""
        raise ValueError(f"{description!r}: the socket systemd passed is "
                         f"AF_{names[family]}{why}, not AF_{names[given]}: give "
                         f"domain={names[family]}")


def _missing_systemd_socket() -> str:
    """Why Twisted found no socket passed by systemd (it reads and clears LISTEN_PID
    and LISTEN_FDS on import, so look at descriptor 3, the first one passed)."""
    import os

    try:
        passed = socket.socket(fileno=os.dup(3))
    except OSError:
        listening = False
    else:
        try:
            listening = passed.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        except OSError:
            listening = False
        finally:
            passed.close()
    if listening and not os.environ.get("LISTEN_FDNAMES"):
        return ("a socket was passed without LISTEN_FDNAMES, which Twisted needs to adopt "
                "it: give systemd-socket-activate --fdname=NAME (systemd itself always "
                "sets it)")
    if listening:
        return "no socket passed by systemd has that index or name"
    return ("no socket was passed by systemd (LISTEN_FDS and LISTEN_PID are not set for "
            "this process): start it from a socket unit, or under systemd-socket-activate "
            "--fdname=NAME")


def _check_unix_path(description: str) -> None:
    """A UNIX socket's directory must exist (Twisted would say so only at start)."""
    import os

    path = description.split(":", 1)[1].split(":", 1)[0]
    if path and not path.startswith("address=") and "=" not in path:
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise ValueError(f"{description!r}: there is no directory {directory!r}")


def parse_optional_endpoint(text: str) -> str:
    """An endpoint string, or empty for none."""
    return parse_endpoint(text) if text.strip() else ""


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def parse_header_name(text: str) -> str:
    """An HTTP header name, such as X-Forwarded-For or X-Real-IP."""
    name = text.strip()
    if not _HEADER_NAME.match(name):
        raise ValueError(f"{text!r} is not an HTTP header name")
    return name


def parse_count(text: str) -> int:
    """A whole number, zero or more (zero turns a limit off where the help says so)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise ValueError(f"{text!r} must not be negative")
    return value


def parse_token(text: str) -> str:
    """A bearer token: printable ASCII without spaces, at least 16 characters. An empty
    one is an error, not "no token": leave the setting out for that."""
    token = text.strip()
    if not token:
        raise ValueError("the token is empty; leave the setting out for no token")
    if (len(token) < 16 or not token.isascii() or not token.isprintable()
            or " " in token):
        raise ValueError("a token must be at least 16 printable ASCII characters, no spaces")
    return token


#: Where events come from: Redis pub/sub (emojitracker's feeder publishes there), or
#: the Redis Stream a bridge appends them to (the shared history).
SOURCES = ("pubsub", "streams")


def parse_source(text: str) -> str:
    """C{pubsub} or C{streams}."""
    word = text.strip().lower()
    if word not in SOURCES:
        raise ValueError(f"{text!r} is not a source (pubsub or streams)")
    return word


def parse_write_policy(text: str) -> str:
    """C{adaptive}, C{direct} or C{batch} (L{emojistream.batching})."""
    word = text.strip().lower()
    if word not in WRITE_POLICIES:
        raise ValueError(f"{text!r} is not a write policy ({', '.join(WRITE_POLICIES)})")
    return word


def parse_log_format(text: str) -> str:
    """C{text} (twistd's usual lines) or C{json} (one JSON object per line)."""
    word = text.strip().lower()
    if word not in ("text", "json"):
        raise ValueError(f"{text!r} is not a log format (text or json)")
    return word


_ENV_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_METRIC_KEY = re.compile(r"^[A-Za-z0-9_.-]*$")


def parse_metric_key(text: str) -> str:
    """A carbon path prefix: letters, digits, C{. _ -} (a space would break the line)."""
    if not _METRIC_KEY.match(text.strip()):
        raise ValueError(f"{text!r} may only hold letters, digits, '.', '_' and '-'")
    return text.strip().strip(".")


#: Longest node name: a host name (64 at most on Linux) with room for the suffixes a
#: templated unit (C{%H-%i}) and the workers (C{-<i>}) add.
MAX_NODE_NAME = 128
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse_node_name(text: str) -> str:
    """A node name such as C{web.1} or a host name: letters, digits, C{. _ -}, starting
    with a letter or digit. It goes into log lines, Redis keys and carbon paths, where
    a newline or a space would forge or break them."""
    if not _NODE_NAME.match(text) or len(text) > MAX_NODE_NAME:
        raise ValueError(f"{text!r} is not a node name (letters, digits, '.', '_' and '-', "
                         f"starting with a letter or digit, {MAX_NODE_NAME} at most)")
    return text


def parse_env_name(text: str) -> str:
    """A deployment environment name such as development, staging or production."""
    if not _ENV_NAME.match(text):
        raise ValueError(f"{text!r} is not an environment name (letters, digits, . _ -)")
    return text


#: Streams held at most unless told otherwise.
MAX_STREAMS = 20000
#: Descriptors kept for everything but streams: Redis, carbon, listeners, logs, and
#: connections that have not yet become streams.
FD_RESERVE = 1024


def fd_reserve(limit: int) -> int:
    """Descriptors to keep for other things under an open-file limit of C{limit}:
    L{FD_RESERVE}, or a quarter of a small limit."""
    return min(FD_RESERVE, limit // 4)


def default_max_streams() -> int:
    """L{MAX_STREAMS}, or as many streams as the hard open-file limit allows if fewer."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return MAX_STREAMS
    return max(1, min(MAX_STREAMS, hard - fd_reserve(hard)))


#: The shortest interval of a periodic timer (keepalive, carbon reports): below it
#: the timers run in nearly every reactor turn, for nothing a client or carbon can use.
MIN_INTERVAL = 0.05
#: The shortest deadline a client is given (request head, forced close, replay age):
#: shorter ones fail clients that are merely a few round trips away.
MIN_DEADLINE = 1.0
#: The most worker processes. Past one per core, more workers add only memory and
#: Redis connections; a fixed cap (not the host's core count) keeps the settings a
#: function of what was given, and stops a typo (C{--workers 1000}) forking a thousand.
MAX_WORKERS = 64
#: The most hits per second the demo feeder publishes: it publishes what is owed each
#: tick, so a huge rate would publish millions in one reactor turn.
MAX_DEMO_RATE = 10_000


def _interval(text: str) -> float:
    return parse_seconds(text, least=MIN_INTERVAL)


def _deadline(text: str) -> float:
    return parse_seconds(text, least=MIN_DEADLINE)


#: A default that depends on the environment or on other settings: given the
#: environment and the settings read so far, the text to parse and what it came from
#: (the name an error gives).
Derive = Callable[[Mapping[str, str], Mapping[str, Any]], tuple[str, str]]


@dataclass(frozen=True)
class Unset:
    """The value of a setting that is not given, where no text means it: an empty
    admin token given is an error, while none given is no token."""

    value: Any


@dataclass(frozen=True)
class Spec:
    """One setting: its environment variable, its option, how to read it and its
    default, the only place the default is written (L{Settings} takes it from here).

    C{default} is the text that is parsed when the setting is not given (and shown by
    --help), a L{Derive} for a default that depends on something else, or L{Unset}."""

    key: str
    option: str
    env: str | None
    parse: Callable[[str], Any]
    default: str | Derive | Unset
    help: str
    is_flag: bool = False

    @property
    def shown_default(self) -> str | None:
        """The default --help shows: the text, when it depends on nothing else."""
        return self.default if isinstance(self.default, str) else None


#: The port served when neither --listen nor PORT says otherwise.
DEFAULT_PORT = 8001


def _listen_default(env: Mapping[str, str], values: Mapping[str, Any]) -> tuple[str, str]:
    port = env.get("PORT") or str(DEFAULT_PORT)
    return f"tcp:{port}:backlog={LISTEN_BACKLOG}", "PORT"


def _default_node(env: Mapping[str, str], values: Mapping[str, Any]) -> tuple[str, str]:
    """The node name and where it came from: C{NODE_NAME} (even empty, which is then
    an error), else Heroku's C{DYNO}, else the host name."""
    if "NODE_NAME" in env:
        return env["NODE_NAME"], "NODE_NAME"
    if env.get("DYNO"):
        return env["DYNO"], "DYNO"
    return socket.gethostname(), "the host name (set NODE_NAME or --node)"


def _max_streams_default(env: Mapping[str, str], values: Mapping[str, Any]
                         ) -> tuple[str, str]:
    return str(default_max_streams()), "the open-file limit"


def _admin_report_default(env: Mapping[str, str], values: Mapping[str, Any]
                          ) -> tuple[str, str]:
    # In demo mode too: the admin page's cluster view then shows the demo node.
    on = values["env"] in ("staging", "production") or values["demo"]
    return str(on).lower(), "--admin-report"


def _demo_page_default(env: Mapping[str, str], values: Mapping[str, Any]
                       ) -> tuple[str, str]:
    return str(values["demo"]).lower(), "--demo-page"


#: Seconds between carbon reports unless told otherwise.
GRAPHITE_INTERVAL = "10"

SPECS: tuple[Spec, ...] = (
    Spec("listen", "listen", None, parse_endpoint, _listen_default,
         f"Endpoint to serve HTTP on, e.g. tcp:{DEFAULT_PORT}:backlog={LISTEN_BACKLOG}, "
         f"tcp:{DEFAULT_PORT}:interface=127.0.0.1 or systemd:domain=INET6:index=0 "
         f"(default: tcp:$PORT:backlog={LISTEN_BACKLOG}, else "
         f"tcp:{DEFAULT_PORT}:backlog={LISTEN_BACKLOG})"),
    Spec("redis", "redis", "REDIS_URL", parse_redis_url, "redis://localhost:6379",
         "Redis to subscribe to, redis://[[user]:password@]host[:port][/db]"),
    Spec("raw_stream", "raw-stream", "ENABLE_RAW_STREAM", parse_bool, "true",
         "Serve /subscribe/raw, one message per score hit", is_flag=True),
    Spec("keepalive", "keepalive", "SSE_KEEPALIVE_SEC", _interval, "15",
         "Seconds between ':' keepalive comments on streams idle that long "
         f"(at least {MIN_INTERVAL:g})"),
    Spec("verbose", "verbose", "VERBOSE", parse_bool, "false",
         "Log every stream connect and disconnect", is_flag=True),
    Spec("env", "env", "RACK_ENV", parse_env_name, "development",
         "Deployment environment name (development, staging, production)"),
    Spec("node", "node", None, parse_node_name, _default_node,
         "This node's name in reports: letters, digits, . _ - (default: $NODE_NAME, else "
         "$DYNO, else the host name)"),
    Spec("kiosk_stream", "kiosk-interaction-stream", "ENABLE_KIOSK_INTERACTION_STREAM",
         parse_bool, "false",
         "Serve /subscribe/kiosk_interaction (subscribes to stream.interaction.*)",
         is_flag=True),
    Spec("force_refresh", "force-refresh", "SSE_FORCE_REFRESH", parse_bool, "false",
         "Legacy forced refresh: retry hints, X-Sse-Cleanup-Requested, closing old streams",
         is_flag=True),
    Spec("score_retry_ms", "score-retry-ms", "SSE_SCORE_RETRY_MS", parse_count, "100",
         "retry: hint of score streams (eps, raw) in forced-refresh mode"),
    Spec("detail_retry_ms", "detail-retry-ms", "SSE_DETAIL_RETRY_MS", parse_count,
         "500", "retry: hint of detail and kiosk streams in forced-refresh mode"),
    Spec("score_max_age", "score-forceclose-sec", "SSE_SCORE_FORCECLOSE_SEC",
         _deadline, "300",
         f"Age at which score streams are closed in forced-refresh mode (at least "
         f"{MIN_DEADLINE:g})"),
    Spec("detail_max_age", "detail-forceclose-sec", "SSE_DETAIL_FORCECLOSE_SEC",
         _deadline, "300",
         "Age at which detail and kiosk streams are closed in forced-refresh mode "
         f"(at least {MIN_DEADLINE:g})"),
    Spec("trust_proxy", "trust-proxy", "TRUST_PROXY", parse_bool, "false",
         "Take the client IP from the address the trusted proxy appended to "
         "X-Forwarded-For (behind a proxy only)", is_flag=True),
    Spec("proxy_hops", "proxy-hops", "PROXY_HOPS", parse_positive_int, "1",
         "With --trust-proxy: how many trusted proxies append to the header; the client "
         "is the address that many from the end"),
    Spec("client_ip_header", "client-ip-header", "CLIENT_IP_HEADER", parse_header_name,
         "X-Forwarded-For", "With --trust-proxy: the header the proxy sets "
         "(e.g. X-Real-IP)"),
    Spec("admin_report", "admin-report", "ADMIN_REPORT", parse_bool, _admin_report_default,
         "HSET this node's status into admin_stream_status every 5 s, and serve the "
         "cluster view (default: on in staging, production and --demo)", is_flag=True),
    Spec("admin_redis", "admin-redis", "ADMIN_REDIS_URL", parse_optional_redis_url, "",
         "Redis the admin reports are written to (default: --redis); for a node "
         "subscribed to a read-only replica, name the primary"),
    Spec("graphite", "graphite", "GRAPHITE_URL", parse_graphite_url, "",
         f"Carbon target for metrics every {GRAPHITE_INTERVAL} s, tcp://host:2003 or "
         "udp://host:2003 "
         "(default: off)"),
    Spec("graphite_interval", "graphite-interval", "GRAPHITE_INTERVAL_SEC",
         _interval, GRAPHITE_INTERVAL,
         f"Seconds between carbon reports (at least {MIN_INTERVAL:g})"),
    Spec("graphite_prefix", "graphite-prefix", "HOSTEDGRAPHITE_APIKEY", parse_metric_key, "",
         "Key put in front of every carbon metric path (hosted graphite's API key)"),
    Spec("max_queue", "max-queue-bytes", "SSE_MAX_QUEUE_BYTES", parse_positive_int, "1048576",
         "Bytes held for a client that is not reading before its event stream is dropped "
         "(its /eps stream is conflated instead)"),
    Spec("send_buffer", "send-buffer-bytes", "SSE_SEND_BUFFER_BYTES", parse_count, "0",
         "SO_SNDBUF of each client socket; smaller finds clients that stopped reading "
         "sooner and holds less kernel memory for them (0: the system's default)"),
    Spec("write_policy", "write-policy", "SSE_WRITE_POLICY", parse_write_policy,
         "adaptive",
         "How messages are written: adaptive (a stream that hears more than ~150 a "
         "second gets them in one write per 1/60 s tick, the others each at once), "
         "direct (each at once) or batch (every stream once per tick: least CPU, up "
         "to a tick more latency)"),
    Spec("batch_writes", "batch-writes", "SSE_BATCH_WRITES", parse_bool, "false",
         "The same as --write-policy batch (kept for existing deployments)",
         is_flag=True),
    Spec("max_payload", "max-payload-bytes", "MAX_PAYLOAD_BYTES", parse_positive_int, "65536",
         "Larger detail and kiosk payloads from Redis are dropped (and counted)"),
    Spec("max_streams", "max-streams", "MAX_STREAMS", parse_positive_int,
         _max_streams_default,
         f"Open streams at most; more get 503 with Retry-After (default: {MAX_STREAMS}, or what "
         "the open-file limit allows if that is less)"),
    Spec("max_streams_per_ip", "max-streams-per-ip", "MAX_STREAMS_PER_IP", parse_count, "0",
         "Open streams per client IP at most, more get 429 (0: no limit)"),
    Spec("request_timeout", "request-timeout", "REQUEST_TIMEOUT_SEC", _deadline,
         "10", "Seconds a client has to send a whole request head; slower ones get 408 "
         f"(answered streams are never timed; at least {MIN_DEADLINE:g})"),
    Spec("max_connections_per_ip", "max-connections-per-ip", "MAX_CONNECTIONS_PER_IP",
         parse_count, "0", "Open TCP connections per client address at most; more are "
         "closed at once (0: no limit; keep 0 behind a proxy)"),
    Spec("admin_listen", "admin-listen", "ADMIN_LISTEN", parse_optional_endpoint, "",
         "Serve /admin/ on this endpoint only (e.g. tcp:8002:interface=127.0.0.1) "
         "instead of the main one"),
    Spec("admin_token", "admin-token", "ADMIN_TOKEN", parse_token, Unset(""),
         "Require 'Authorization: Bearer <token>' for /admin/status.json, "
         "/admin/cluster.json and /metrics (16+ characters; empty is an error, leave it "
         "out for none)"),
    Spec("drain", "drain-sec", "SSE_DRAIN_SEC", parse_positive_float, "10",
         "On SIGTERM, close streams spread over this many seconds, then exit"),
    Spec("log_format", "log-format", "LOG_FORMAT", parse_log_format, "text",
         "Log as text lines or as one JSON object per line on standard output (json)"),
    Spec("workers", "workers", "WORKERS",
         parse_at_most(parse_positive_int, MAX_WORKERS, "one per core is the most that helps"),
         "1",
         "Run this many worker processes on the --listen port (SO_REUSEPORT), each "
         "subscribed to Redis and reporting as <node>-<i>; the parent restarts any that "
         f"dies and stops all on SIGTERM (at most {MAX_WORKERS})"),
    Spec("event_ids", "event-ids", "SSE_EVENT_IDS", parse_bool, "false",
         "Resumable streams: every event carries an id:, and a client reconnecting with "
         "Last-Event-ID (or ?last_event_id=) first gets what it missed (always on with "
         "--source streams)", is_flag=True),
    Spec("source", "source", "EMOJISTREAM_SOURCE", parse_source, "pubsub",
         "Where events come from: pubsub (SUBSCRIBE, as emojitracker's feeder publishes) "
         "or streams (the Redis Stream --stream-key, which emojistream-bridge appends "
         "to: nothing lost while a node reconnects, and event IDs the same on every "
         "node, so --event-ids is on whatever it says)"),
    Spec("stream_key", "stream-key", "EMOJISTREAM_STREAM_KEY", parse_stream_key,
         DEFAULT_STREAM_KEY, "With --source streams: the Redis Stream read (its epoch is "
         "<key>:epoch, the bridge's lease <key>:bridge)"),
    Spec("replay_events", "replay-events", "SSE_REPLAY_EVENTS", parse_positive_int, "10000",
         "With --event-ids: events kept for replay per namespace at most"),
    Spec("replay_age", "replay-sec", "SSE_REPLAY_SEC", _deadline, "300",
         "With --event-ids: seconds an event is kept for replay at most "
         f"(at least {MIN_DEADLINE:g})"),
    Spec("replay_bytes", "replay-bytes", "SSE_REPLAY_BYTES", parse_positive_int, "33554432",
         "With --event-ids: memory all replay buffers hold at most (the largest give up "
         "their oldest events first)"),
    Spec("demo_page", "demo-page", "DEMO_PAGE", parse_bool, _demo_page_default,
         "Serve the live emoji grid at / (default: on with --demo)", is_flag=True),
    Spec("demo", "demo", None, parse_bool, "false",
         "Start a private redis-server and a synthetic feeder publishing into it "
         "(with --redis, feed that Redis instead)", is_flag=True),
    Spec("demo_rate", "demo-rate", None,
         parse_at_most(parse_positive_float, MAX_DEMO_RATE, "hits per second"), "250",
         f"Hits per second the --demo feeder publishes (at most {MAX_DEMO_RATE})"),
    Spec("tls_ciphers", "tls-ciphers", "TLS_CIPHERS", parse_ciphers, "",
         "TLS 1.2 cipher suites of ssl: listeners, in OpenSSL's syntax (default: "
         "Mozilla's intermediate list, forward secrecy and AEAD only; TLS 1.3 suites "
         "are OpenSSL's)"),
)


def _spec(specs: Sequence[Spec], key: str) -> Spec:
    (spec,) = (spec for spec in specs if spec.key == key)
    return spec


def _plain_defaults(specs: Sequence[Spec]) -> dict[str, Any]:
    """The settings whose default is a text, parsed: what derived defaults of an empty
    environment depend on."""
    return {spec.key: spec.parse(spec.default) for spec in specs
            if isinstance(spec.default, str)}


def _default_of(specs: Sequence[Spec], key: str) -> Any:
    """The value of setting C{key} when nothing gives it, environment empty: its
    table default, parsed (derived ones from the other settings' defaults)."""
    spec = _spec(specs, key)
    default = spec.default
    if isinstance(default, Unset):
        return default.value
    if isinstance(default, str):
        return spec.parse(default)
    return spec.parse(default({}, _plain_defaults(specs))[0])


def table_default(specs: Sequence[Spec], key: str) -> Callable[[], Any]:
    """A settings field's default factory: the default in C{specs}, not written
    again in the settings class."""
    return partial(_default_of, specs, key)


def _table(key: str) -> Callable[[], Any]:
    """A L{Settings} field's default factory, reading L{SPECS} when called."""
    return lambda: _default_of(SPECS, key)


@dataclass(frozen=True)
class Settings:
    """Every setting the daemon runs with, already validated.

    C{Settings()} is what an empty environment and no options give: each default
    comes from L{SPECS}, where it is written once."""

    listen: str = field(default_factory=_table("listen"))
    redis: RedisAddress = field(default_factory=_table("redis"))
    redis_given: bool = False
    raw_stream: bool = field(default_factory=_table("raw_stream"))
    keepalive: float = field(default_factory=_table("keepalive"))
    verbose: bool = field(default_factory=_table("verbose"))
    env: str = field(default_factory=_table("env"))
    node: str = field(default_factory=_table("node"))
    kiosk_stream: bool = field(default_factory=_table("kiosk_stream"))
    force_refresh: bool = field(default_factory=_table("force_refresh"))
    score_retry_ms: int = field(default_factory=_table("score_retry_ms"))
    detail_retry_ms: int = field(default_factory=_table("detail_retry_ms"))
    score_max_age: float = field(default_factory=_table("score_max_age"))
    detail_max_age: float = field(default_factory=_table("detail_max_age"))
    trust_proxy: bool = field(default_factory=_table("trust_proxy"))
    proxy_hops: int = field(default_factory=_table("proxy_hops"))
    client_ip_header: str = field(default_factory=_table("client_ip_header"))
    admin_report: bool = field(default_factory=_table("admin_report"))
    admin_redis: RedisAddress | None = field(default_factory=_table("admin_redis"))
    graphite: GraphiteTarget | None = field(default_factory=_table("graphite"))
    graphite_interval: float = field(default_factory=_table("graphite_interval"))
    graphite_prefix: str = field(default_factory=_table("graphite_prefix"))
    log_format: str = field(default_factory=_table("log_format"))
    max_queue: int = field(default_factory=_table("max_queue"))
    max_payload: int = field(default_factory=_table("max_payload"))
    send_buffer: int = field(default_factory=_table("send_buffer"))
    write_policy: str = field(default_factory=_table("write_policy"))
    batch_writes: bool = field(default_factory=_table("batch_writes"))
    max_streams: int = field(default_factory=_table("max_streams"))
    max_streams_per_ip: int = field(default_factory=_table("max_streams_per_ip"))
    request_timeout: float = field(default_factory=_table("request_timeout"))
    max_connections_per_ip: int = field(default_factory=_table("max_connections_per_ip"))
    admin_listen: str = field(default_factory=_table("admin_listen"))
    admin_token: str = field(default_factory=_table("admin_token"))
    drain: float = field(default_factory=_table("drain"))
    workers: int = field(default_factory=_table("workers"))
    event_ids: bool = field(default_factory=_table("event_ids"))
    source: str = field(default_factory=_table("source"))
    stream_key: str = field(default_factory=_table("stream_key"))
    replay_events: int = field(default_factory=_table("replay_events"))
    replay_age: float = field(default_factory=_table("replay_age"))
    replay_bytes: int = field(default_factory=_table("replay_bytes"))
    demo_page: bool = field(default_factory=_table("demo_page"))
    demo: bool = field(default_factory=_table("demo"))
    demo_rate: float = field(default_factory=_table("demo_rate"))
    tls_ciphers: str = field(default_factory=_table("tls_ciphers"))

    @property
    def node_name(self) -> str:
        """This node's name in status reports: C{<platform>-<env>-<node>}."""
        return f"{PLATFORM}-{self.env}-{self.node}"


def _parse(spec: Spec, text: str, source: str) -> Any:
    try:
        return spec.parse(text)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def resolve_table(specs: Sequence[Spec], env: Mapping[str, str],
                  options: Mapping[str, str | None]) -> dict[str, Any]:
    """Each setting of C{specs}, validated: from C{options} (the text given on the
    command line by key, None when not given), else its environment variable, else
    its table default; those derived from the environment or other settings
    (L{Derive}) once all the others are known. Raises L{ConfigError} naming the
    offending setting."""
    values: dict[str, Any] = {}
    derived: list[tuple[Spec, Derive]] = []
    for spec in specs:
        given = options.get(spec.key)
        source = f"--{spec.option}"
        if given is None and spec.env is not None and spec.env in env:
            given, source = env[spec.env], spec.env
        if given is None:
            if isinstance(spec.default, Unset):
                values[spec.key] = spec.default.value
                continue
            if not isinstance(spec.default, str):
                derived.append((spec, spec.default))
                continue
            given = spec.default
        values[spec.key] = _parse(spec, given, source)
    for spec, derive in derived:
        given, source = derive(env, values)
        values[spec.key] = _parse(spec, given, source)
    return values


def _write_policy(env: Mapping[str, str], options: Mapping[str, str | None],
                  values: Mapping[str, Any]) -> str:
    """The write policy: C{--batch-writes} (C{SSE_BATCH_WRITES}) is another way to say
    C{--write-policy batch} (C{SSE_WRITE_POLICY=batch}), and C{--no-batch-writes}
    one to say "not batch". An option wins over the environment, as everywhere;
    raises L{ConfigError} when both are given at the same level and disagree."""
    policy: str = values["write_policy"]
    batch: bool = values["batch_writes"]

    def level(key: str, variable: str) -> int:
        return 2 if options.get(key) is not None else 1 if variable in env else 0

    policy_level = level("write_policy", "SSE_WRITE_POLICY")
    alias_level = level("batch_writes", "SSE_BATCH_WRITES")
    if alias_level > policy_level:
        if batch:
            return BATCH
        return policy if policy != BATCH else str(_default_of(SPECS, "write_policy"))
    if alias_level == policy_level and alias_level and batch != (policy == BATCH):
        if alias_level == 2:
            said = ("--batch-writes" if batch else "--no-batch-writes",
                    f"--write-policy {policy}")
        else:
            said = (f"SSE_BATCH_WRITES={env['SSE_BATCH_WRITES']}",
                    f"SSE_WRITE_POLICY={env['SSE_WRITE_POLICY']}")
        raise ConfigError(f"{said[0]} contradicts {said[1]} (--batch-writes is "
                          "--write-policy batch)")
    return policy


def resolve(env: Mapping[str, str], options: Mapping[str, str | None]) -> Settings:
    """Combine environment and options (options win) into validated L{Settings}
    (L{resolve_table} of L{SPECS}); raises L{ConfigError} naming the offending
    setting."""
    values = resolve_table(SPECS, env, options)
    values["redis_given"] = (
        options.get("redis") is not None or "REDIS_URL" in env
    )
    values["write_policy"] = _write_policy(env, options, values)
    if values["source"] == "streams":
        # A stream source's events are resumable by nature: their IDs are the
        # stream's, the same on every node.
        values["event_ids"] = True
    return Settings(**values)
