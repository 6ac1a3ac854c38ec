"""The process around the daemon: file-descriptor limit, an orderly stop, and a
graceful drain of open streams on SIGTERM."""

from __future__ import annotations

import atexit
import gc
import os
import random
import resource
import signal
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.logger import Logger

from emojistream.config import FD_RESERVE, fd_reserve
from emojistream.hub import Hub
from emojistream.sse import encode_retry
from emojistream.stream import Stream

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


def fit_fd_limit(max_streams: int) -> int | None:
    """Raise the open-file limit to hold C{max_streams} streams (each is a socket) and
    the descriptors everything else needs; warn if it cannot be. Returns the soft
    limit now in force (None: unlimited)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = FD_RESERVE if hard == resource.RLIM_INFINITY else fd_reserve(hard)
    wanted = max_streams + reserve
    soft, _hard = raise_fd_limit(wanted)
    if soft < wanted:
        log.warn("Open-file limit is {soft}: --max-streams {n} needs {wanted} descriptors, "
                 "so at most {fit} streams can be held (raise LimitNOFILE / ulimit -n, "
                 "or lower --max-streams)", soft=soft, n=max_streams, wanted=wanted,
                 fit=max(0, soft - reserve))
    return None if soft == resource.RLIM_INFINITY else soft


class Signals(Service):
    """What the signals operators send do, installed when the daemon starts: SIGTERM and
    SIGINT stop it (draining streams) with exit status 0; SIGHUP calls C{reload} (the
    workers' rolling restart) or is logged where there is nothing to reload; SIGUSR1
    rotates the log file where twistd logs to one, and is logged otherwise. None of
    them ends the process abruptly, as their default actions would.

    twistd's own SIGTERM handler re-raises the signal at exit, so a service manager
    would see the process killed by it; a requested, completed stop is a success.
    """

    def __init__(self, reactor: Any, *, reload: Callable[[], object] | None = None,
                 stopping: str = "draining streams and stopping",
                 nothing_to_reload: str = "a single process has nothing to reload; serving "
                 "on (SIGTERM stops it; under --workers SIGHUP replaces the workers)") -> None:
        self._reactor = reactor
        #: What SIGHUP does, if anything.
        self.reload = reload
        #: What the log says a stop does, and SIGHUP where there is nothing to reload.
        self._stopping_words = stopping
        self._nothing_to_reload = nothing_to_reload
        self._stopping = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # Before anything listens, for a signal that comes while the daemon is starting
        # (the stop then runs as soon as the reactor does), and again right after the
        # reactor's own handlers, which it installs "during startup": in that phase
        # too, so that nothing runs between (the "after startup" calls include the
        # start-up garbage collection, tens of milliseconds in which a SIGTERM would
        # meet the reactor's handler and end the process killed by it).
        self._install()
        if not getattr(self._reactor, "running", False):
            self._reactor.addSystemEventTrigger("during", "startup", self._install)

    def _install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._hup)
        # twistd rotates its log file on SIGUSR1 when it logs to one; else it is ours.
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None, self._usr1):
            signal.signal(signal.SIGUSR1, self._usr1)

    def _stop(self, signum: int, frame: object) -> None:
        if self._stopping:
            # A second signal (a process group's, or an impatient operator's): the
            # stop is under way already.
            return
        self._stopping = True
        self._reactor.callFromThread(self._log_and_stop, signal.Signals(signum).name)

    def _log_and_stop(self, name: str) -> None:
        log.info("Received {name}, {what}", name=name, what=self._stopping_words)
        self._reactor.stop()

    def _hup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._reload_now)

    def _reload_now(self) -> None:
        if self.reload is None:
            log.info("Received SIGHUP: {why}", why=self._nothing_to_reload)
        else:
            log.info("Received SIGHUP: replacing the workers one at a time")
            self.reload()

    def _usr1(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(
            log.info, "Received SIGUSR1: logging to standard output, nothing to reopen")


def exit_after_stop(reactor: Any, code: int) -> None:
    """Stop the reactor (services stop in order) and leave the process with status
    C{code}: twistd itself always exits 0 once its reactor stops."""

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            with suppress(Exception):
                stream.flush()
        os._exit(code)

    # Registered now, after twistd's own exit handlers: it runs first at exit, once
    # the stop, the pid file's removal and the log's end are done.
    atexit.register(leave)
    reactor.stop()


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


class ProcessLimits(Service):
    """What a daemon process (twistd plugin or .tac) sets in its process when it
    starts, never when it is built: the open-file limit its streams need (told to
    C{limit_found}, the connection gate), and the start-up objects frozen out of the
    garbage collector's walks once the reactor runs."""

    def __init__(self, reactor: Any, max_streams: int,
                 limit_found: Callable[[int | None], object]) -> None:
        self._reactor = reactor
        self._max_streams = max_streams
        self._limit_found = limit_found

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # Before anything listens: the listeners' sockets count against it.
        self._limit_found(fit_fd_limit(self._max_streams))

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(freeze_startup_objects)


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
        self.period = period
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
        log.info("Draining {n} streams over {s:g} s", n=len(streams), s=self.period)
        done: Deferred[None] = Deferred()
        remaining = len(streams)

        def close(stream: Stream) -> None:
            nonlocal remaining
            # The server is going away: end the connection, not just the response.
            stream.close(hang_up=True)
            remaining -= 1
            if remaining == 0:
                done.callback(None)

        for stream in streams:
            stream.send_control(encode_retry(self.retry_hint()))
            # Spread over the first 90 % of the period: the last is closed in time.
            self._clock.callLater(self.period * 0.9 * self._rand(), close, stream)
        return done
