"""The bridge's twistd plugin: C{twistd -n emojistream-bridge [options]}.

Settings the bridge shares with the daemon read the daemon's environment names
(C{REDIS_URL}, C{ENABLE_KIOSK_INTERACTION_STREAM}, C{LOG_FORMAT}), so both can run
from one environment file; its own have C{EMOJISTREAM_} names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import succeed

from emojistream.bridge import DEFAULT_LEASE, MIN_LEASE, Bridge, RedisHistory, Subscriber
from emojistream.config import (
    RedisAddress,
    Spec,
    parse_at_most,
    parse_bool,
    parse_log_format,
    parse_positive_int,
    parse_redis_url,
    parse_seconds,
    resolve_table,
    table_default,
)
from emojistream.history import DEFAULT_MAXLEN, DEFAULT_STREAM_KEY, parse_stream_key
from emojistream.lifecycle import ExitOnStartupError, OrderedStop, Signals
from emojistream.notify import Notifier
from emojistream.options import TableOptions, option_lists
from emojistream.redisconn import RedisConnection
from emojistream.vocabulary import DETAIL_PATTERN, KIOSK_PATTERN, SCORE_CHANNEL

#: The longest lease: a standby waits this long for a holder that died silently.
MAX_LEASE = 3600.0
#: The most entries kept: well past what a Redis host holds (180 bytes an entry).
MAX_MAXLEN = 1_000_000_000


def _lease(text: str) -> float:
    return float(parse_at_most(lambda t: parse_seconds(t, least=MIN_LEASE), MAX_LEASE,
                               "seconds")(text))


SPECS: tuple[Spec, ...] = (
    Spec("redis", "redis", "REDIS_URL", parse_redis_url, "redis://localhost:6379",
         "Redis the feeder publishes to and the stream lives in, "
         "redis://[[user]:password@]host:port[/db]"),
    Spec("stream_key", "stream-key", "EMOJISTREAM_STREAM_KEY", parse_stream_key,
         DEFAULT_STREAM_KEY, "Key of the Redis Stream the messages are appended to "
         "(its epoch and lease are <key>:epoch and <key>:bridge)"),
    Spec("maxlen", "stream-maxlen", "EMOJISTREAM_STREAM_MAXLEN",
         parse_at_most(parse_positive_int, MAX_MAXLEN, "entries"), str(DEFAULT_MAXLEN),
         "Entries the stream keeps, about (XADD MAXLEN ~): the default is an hour at "
         "400 hits/s, two messages each, some 520 MB of Redis"),
    Spec("kiosk_stream", "kiosk-stream", "ENABLE_KIOSK_INTERACTION_STREAM", parse_bool,
         "false", "Bridge the kiosk channels (stream.interaction.*) too; give every "
         "bridge of one stream the same", is_flag=True),
    Spec("lease", "lease", "EMOJISTREAM_BRIDGE_LEASE", _lease, f"{DEFAULT_LEASE:g}",
         "Seconds of the appending bridge's lease: a standby takes over within about "
         f"this long of a silent death (at least {MIN_LEASE:g})"),
    Spec("log_format", "log-format", "LOG_FORMAT", parse_log_format, "text",
         "Log as text lines or as one JSON object per line on standard output (json)"),
)


@dataclass(frozen=True)
class BridgeSettings:
    """Every setting the bridge runs with, already validated; C{BridgeSettings()} is
    what nothing given resolves to (each default written once, in L{SPECS})."""

    redis: RedisAddress = field(default_factory=table_default(SPECS, "redis"))
    stream_key: str = field(default_factory=table_default(SPECS, "stream_key"))
    maxlen: int = field(default_factory=table_default(SPECS, "maxlen"))
    kiosk_stream: bool = field(default_factory=table_default(SPECS, "kiosk_stream"))
    lease: float = field(default_factory=table_default(SPECS, "lease"))
    log_format: str = field(default_factory=table_default(SPECS, "log_format"))


def resolve(env: Mapping[str, str], options: Mapping[str, str | None]) -> BridgeSettings:
    """Environment and options (options win) as validated L{BridgeSettings}; raises
    L{ConfigError} naming the offending setting."""
    return BridgeSettings(**resolve_table(SPECS, env, options))


class Options(TableOptions[BridgeSettings]):
    """Command-line options; each overrides its environment variable."""

    synopsis = "[options]"
    longdesc = ("Appends the messages emojitracker's feeder PUBLISHes to a Redis Stream, "
                "the shared history emojistream nodes can read. Run several for safety: "
                "one holds a lease in Redis and appends, the others stand by.")
    specs = SPECS
    program = "emojistream-bridge"
    optParameters, optFlags = option_lists(SPECS)

    def settle(self, given: Mapping[str, str | None]) -> BridgeSettings:
        return resolve(self.environ, given)


def bridge_service(settings: BridgeSettings, reactor: Any,
                   environ: Mapping[str, str] | None = None) -> tuple[IService, Bridge]:
    """The bridge's service tree and the bridge in it. It stops in order: the
    subscriber first (nothing new comes), then the bridge (appends what waits, gives
    the lease up), then the command connection."""
    environ = os.environ if environ is None else environ
    root = ExitOnStartupError()
    Signals(reactor, stopping="appending what waits, giving the lease up and stopping",
            nothing_to_reload="a bridge has nothing to reload; bridging on (SIGTERM "
            "stops it)").setServiceParent(root)
    tree = OrderedStop()
    tree.setServiceParent(root)
    commands = RedisConnection(settings.redis, reactor=reactor, purpose="command")
    commands.setServiceParent(tree)
    history = RedisHistory(commands, settings.stream_key, maxlen=settings.maxlen)
    bridge = Bridge(history, clock=reactor, stream_key=settings.stream_key,
                    lease=settings.lease)
    bridge.setServiceParent(tree)
    patterns = (DETAIL_PATTERN, KIOSK_PATTERN) if settings.kiosk_stream else (DETAIL_PATTERN,)
    subscriber = Subscriber(settings.redis, bridge, reactor=reactor,
                            channels=(SCORE_CHANNEL, bridge.release_channel),
                            patterns=patterns)
    bridge.hears_through(subscriber)
    subscriber.setServiceParent(tree)
    notifier = Notifier.for_systemd(environ, clock=reactor, listening=lambda: succeed(None),
                                    status=bridge.summary)
    if notifier is not None:
        # Added last, stopped first: STOPPING=1 goes as the stop begins.
        notifier.setServiceParent(tree)
    return root, bridge


def makeService(options: Options, reactor: Any = None) -> IService:
    """The bridge's service tree, built from parsed options."""
    if reactor is None:
        from twisted.internet import reactor
    assert options.settings is not None
    return bridge_service(options.settings, reactor, options.environ)[0]
