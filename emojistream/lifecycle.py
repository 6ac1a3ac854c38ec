"""The process around the daemon: file-descriptor limit, an orderly stop, and a
graceful drain of open streams on SIGTERM."""

from __future__ import annotations

import gc
import os
import random
import resource
import signal
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.logger import Logger

from emojistream.config import FD_RESERVE, fd_reserve
from emojistream.hub import Hub
from emojistream.sse import encode_retry

log = Logger()


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards C{wanted} descriptors; returns the
    (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warn("Could not raise the open-file limit to {n}: {e}", n=target, e=e)
    return soft, hard


def fit_fd_limit(max_streams: int) -> None:
    """Raise the open-file limit to hold C{max_streams} streams (each is a socket) and
    the descriptors everything else needs; warn if it cannot be."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = FD_RESERVE if hard == resource.RLIM_INFINITY else fd_reserve(hard)
    wanted = max_streams + reserve
    soft, _hard = raise_fd_limit(wanted)
    if soft < wanted:
        log.warn("Open-file limit is {soft}: --max-streams {n} needs {wanted} descriptors, "
                 "so at most {fit} streams can be held (raise LimitNOFILE / ulimit -n, "
                 "or lower --max-streams)", soft=soft, n=max_streams, wanted=wanted,
                 fit=max(0, soft - reserve))


def stop_cleanly_on_signals(reactor: Any) -> None:
    """Make SIGTERM and SIGINT stop the reactor (draining streams) and exit 0.

    twistd's own handlers re-raise the signal at exit, so a service manager sees
    the process killed by it; a requested, completed stop is a success.
    """

    stopping = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:
            # A second signal (a process group's, or an impatient operator's): the
            # stop is under way already.
            return
        stopping = True
        log.info("Received {name}, draining streams and stopping",
                 name=signal.Signals(signum).name)
        reactor.callFromThread(reactor.stop)

    def install() -> None:
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # Now, for a signal that comes while the daemon is starting (the stop then runs
    # as soon as the reactor does), and again after the reactor's own handlers,
    # which it installs as it starts.
    install()
    reactor.callWhenRunning(install)


def freeze_startup_objects() -> None:
    """Collect start-up garbage once, then exempt everything alive from future
    garbage collections (C{gc.freeze}).

    Twisted, Klein and their imports leave some 200,000 objects that live as long
    as the process; every full collection (set off by a wave of clients arriving or
    leaving) walked them all and stalled the reactor 60-70 ms with 1,000 clients.
    Collections now walk only what was created since: the streams and connections.
    """
    gc.collect()
    gc.freeze()


def prepare_process(reactor: Any, max_streams: int) -> None:
    """What a daemon process (twistd plugin or .tac) needs beyond its service tree."""
    fit_fd_limit(max_streams)
    stop_cleanly_on_signals(reactor)
    reactor.callWhenRunning(freeze_startup_objects)


class StartupError(Exception):
    """The daemon cannot start for a reason the operator can fix (one line)."""


class ExitOnStartupError(MultiService):
    """The root service under twistd: a start-up failure the operator can fix (a
    port in use, say) ends the process with its one-line message, not a traceback."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as e:
            raise SystemExit(f"emojistream: {e}") from None


class OrderedStop(MultiService):
    """A MultiService that stops its children one at a time, last added first, each
    once the one before has finished stopping (listeners, then drain, then Redis)."""

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for service in reversed(list(self)):
            try:
                yield maybeDeferred(service.stopService)
            except Exception:
                log.failure("Stopping {service} failed", service=service)


class Drain(Service):
    """On stop, tells every open stream to come back after a jittered C{retry:}
    delay and closes the streams spread over C{period} seconds, so that their
    reconnections do not arrive elsewhere as one wave."""

    def __init__(self, hub: Hub, *, clock: Any, period: float,
                 rand: Callable[[], float] = random.random) -> None:
        self._hub = hub
        self._clock = clock
        self._period = period
        self._rand = rand
        #: True once the drain has begun: new streams are told to go elsewhere.
        self.draining = False

    def retry_hint(self) -> int:
        """Milliseconds a drained client waits before reconnecting: 1 to 4 s."""
        return 1000 + int(3000 * self._rand())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.draining = True
        streams = list(self._hub.streams())
        if not streams:
            return succeed(None)
        log.info("Draining {n} streams over {s:g} s", n=len(streams), s=self._period)
        done: Deferred[None] = Deferred()
        remaining = len(streams)

        def close(stream: Any) -> None:
            nonlocal remaining
            # The server is going away: end the connection, not just the response.
            stream.close(hang_up=True)
            remaining -= 1
            if remaining == 0:
                done.callback(None)

        for stream in streams:
            stream.send_control(encode_retry(self.retry_hint()))
            # Spread over the first 90 % of the period: the last is closed in time.
            self._clock.callLater(self._period * 0.9 * self._rand(), close, stream)
        return done


class SystemdNotifier(Service):
    """Tells systemd how the daemon is doing (C{Type=notify}): C{READY=1} once it is
    listening, C{WATCHDOG=1} from a reactor timer (so only a turning reactor keeps
    the watchdog quiet), C{STATUS=} with the open streams and the Redis state, and
    C{STOPPING=1} when the stop (and so the drain) begins.

    Built by L{SystemdNotifier.from_environment} only when C{NOTIFY_SOCKET} is set.
    """

    def __init__(self, address: str, *, clock: Any, listening: Callable[[], Deferred[Any]],
                 status: Callable[[], str], watchdog: float | None = None) -> None:
        # An address starting with "@" is in Linux's abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._clock = clock
        self._listening = listening
        self._status = status
        self._watchdog = watchdog
        self._socket: socket.socket | None = None
        self._timer: Any = None
        self._failed = False
        self.ready = False

    @classmethod
    def from_environment(cls, environ: dict[str, str] | Any, **kwargs: Any
                         ) -> SystemdNotifier | None:
        """A notifier for the socket systemd named, or None outside systemd. The
        variables are taken out of C{environ}, so child processes do not inherit them."""
        address = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        pid = environ.pop("WATCHDOG_PID", None)
        if not address:
            return None
        watchdog = None
        if usec and usec.isdigit() and int(usec) > 0 and pid in (None, str(os.getpid())):
            # Twice per period, as sd_watchdog_enabled(3) advises.
            watchdog = int(usec) / 2e6
        return cls(address, watchdog=watchdog, **kwargs)

    def notify(self, message: str) -> None:
        """Send one notification; a failure is logged once and never raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode("utf-8"), self._address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warn("Cannot notify systemd at {address}: {e}", address=self._address,
                         e=e)

    def startService(self) -> None:
        super().startService()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._listening().addCallback(self._ready)
        if self._watchdog is not None:
            from twisted.internet.task import LoopingCall

            self._timer = LoopingCall(self._ping)
            self._timer.clock = self._clock
            self._timer.start(self._watchdog, now=True)

    def _ready(self, _: object) -> None:
        if self.running:
            self.ready = True
            self.notify(f"READY=1\nSTATUS={self._status()}")

    def _ping(self) -> None:
        self.notify("WATCHDOG=1" + (f"\nSTATUS={self._status()}" if self.ready else ""))

    def stopService(self) -> None:
        super().stopService()
        self.notify("STOPPING=1\nSTATUS=draining streams and stopping")
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
