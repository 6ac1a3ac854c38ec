"""The processes of C{--workers N}: how the parent starts each worker and hears from
it, and each worker's end of that link. What the parent decides about its workers is
in L{emojistream.supervisor}.

A worker is C{twistd -n emojistream} run by the parent's own interpreter with the
parent's own C{sys.path} (whatever the current directory holds), given one end of a
socket pair as descriptor 3. Over it the worker says what a daemon tells systemd
(READY, WATCHDOG twice a second, STATUS, STOPPING), framed as netstrings; the parent
alone talks to systemd. When the parent ends, by any cause, the worker reads the end
of the link and stops within a second or two, closing its listeners at once, so no
orphan holds the port. A worker logs events as JSON lines, which the parent logs as
its own with the worker's number and pid, in the parent's format and to its log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import IO, Any

from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    globalLogPublisher,
)
from twisted.protocols.basic import NetstringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from emojistream.children import child_environment
from emojistream.notify import parse_notification
from emojistream.supervisor import WorkerEvents

log = Logger()

#: Set in a worker's environment: its number. A process that has it never starts workers.
WORKER_VARIABLE = "EMOJISTREAM_WORKER"
#: The worker's end of the link to its parent.
LINK_FD = 3
#: How a worker starts: the parent's C{sys.path} (argument 1), then twistd. C{-P} keeps
#: the current directory off the path before that.
BOOT = ("import sys, json; sys.path[:] = json.loads(sys.argv.pop(1)); "
        "sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()")
#: twistd's observer for a worker's log: JSON lines the parent reads back.
RELAY_LOGGER = "emojistream.workers.relay_stdout"


def worker_environment(environ: Mapping[str, str], number: int) -> dict[str, str]:
    """A worker's environment: the parent's, less what is the parent's alone (systemd's
    variables, C{WORKERS}), and with its number."""
    env = child_environment(environ, drop=("WORKERS",))
    env[WORKER_VARIABLE] = str(number)
    return env


def worker_number(environ: Mapping[str, str]) -> int | None:
    """This process's worker number, if its parent started it as a worker."""
    value = environ.get(WORKER_VARIABLE, "")
    return int(value) if value.isdigit() else None


def worker_command(twistd_arguments: Sequence[str]) -> list[str]:
    """The command line of a worker running C{twistd_arguments}."""
    return [sys.executable, "-P", "-c", BOOT, json.dumps(sys.path), "--nodaemon",
            "--pidfile=", "--logger", RELAY_LOGGER, *twistd_arguments]


# -- the parent's side ------------------------------------------------------------------


class _Handle:
    """A running worker: its pid, and signals to it."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.pid: int = transport.pid

    def signal(self, signum: int) -> None:
        with suppress(ProcessExitedAlready, OSError):
            self._transport.signalProcess(signum)


class _LinkFromWorker(NetstringReceiver):
    """The parent's end of the link: each netstring is one notification."""

    def __init__(self, events: WorkerEvents) -> None:
        self._events = events

    def stringReceived(self, string: bytes) -> None:
        self._events.notified(parse_notification(string.decode("utf-8", "replace")))


class _WorkerProcess(ProcessProtocol):
    """A worker's output, logged as the parent's own events; its end reported."""

    def __init__(self, number: int, events: WorkerEvents, publish: Callable[[Any], None]
                 ) -> None:
        self._number = number
        self._events = events
        self._publish = publish
        self._partial = {1: b"", 2: b""}
        self.pid = 0

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self._partial:
            return
        lines, _, self._partial[childFD] = (self._partial[childFD] + data).rpartition(b"\n")
        if lines:
            for line in lines.split(b"\n"):
                self._relay(line)

    def _relay(self, line: bytes) -> None:
        event = relayed_event(line.decode("utf-8", "replace"), self._number, self.pid)
        if event is None:
            return
        self._events.said(formatEvent(event))
        self._publish(event)

    def processEnded(self, reason: Failure) -> None:
        for rest in self._partial.values():
            if rest:
                self._relay(rest)
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self._events.ended(f"killed by {signal.Signals(sig).name}" if sig
                           else f"exit code {code}")


_LEVELS = ("debug", "info", "warn", "error", "critical")


def relayed_event(line: str, number: int, pid: int) -> dict[str, Any] | None:
    """The log event a worker's output line stands for, marked with the worker: one of
    L{relay_record}'s JSON lines, or any other line (a traceback before logging began)
    as a warning of its own."""
    text = line.rstrip("\r")
    if not text.strip():
        return None
    record: dict[str, Any] = {}
    if text.startswith("{"):
        with suppress(ValueError):
            record = json.loads(text)
    if not isinstance(record, dict) or "text" not in record:
        record = {"text": text, "level": "warn", "namespace": "stderr"}
    name = record.get("level")
    level = LogLevel.levelWithName(name) if name in _LEVELS else LogLevel.info
    namespace = str(record.get("namespace", "-"))
    event: dict[str, Any] = {
        "log_format": "{log_text}",
        "log_text": str(record["text"]),
        "log_level": level,
        "log_namespace": namespace,
        "log_system": f"worker-{number} pid {pid} {namespace}#{level.name}",
        "worker": number,
        "worker_pid": pid,
    }
    stamp = record.get("time")
    event["log_time"] = float(stamp) if isinstance(stamp, int | float) else time.time()
    return event


def relay_record(event: dict[str, Any]) -> dict[str, Any]:
    """What a worker writes of one log event, for its parent to log."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}"
    level = event.get("log_level")
    return {"time": event.get("log_time"), "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", "-"), "text": text}


@implementer(ILogObserver)
class _RelayObserver:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        self._out.write(json.dumps(relay_record(event), ensure_ascii=False, default=str)
                        + "\n")
        self._out.flush()


def relay_stdout() -> _RelayObserver:
    """twistd C{--logger} factory of a worker: L{relay_record} lines on standard output."""
    return _RelayObserver(sys.__stdout__ or sys.stdout)


class ProcessLauncher:
    """Starts workers as processes (the L{emojistream.supervisor.Launcher} of a real
    parent).

    @param arguments: the twistd arguments of worker number C{i}.
    """

    def __init__(self, reactor: Any, arguments: Callable[[int], Sequence[str]],
                 environ: Mapping[str, str],
                 publish: Callable[[Any], None] | LogPublisher = globalLogPublisher
                 ) -> None:
        self._reactor = reactor
        self._arguments = arguments
        self._environ = environ
        self._publish = publish

    def launch(self, number: int, events: WorkerEvents) -> _Handle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = _WorkerProcess(number, events, self._publish)
            command = worker_command(self._arguments(number))
            os.set_inheritable(theirs.fileno(), True)
            transport = self._reactor.spawnProcess(
                process, command[0], command, env=worker_environment(self._environ, number),
                childFDs={0: "w", 1: "r", 2: "r", LINK_FD: theirs.fileno()})
            process.pid = transport.pid
            self._reactor.adoptStreamConnection(
                ours.fileno(), socket.AF_UNIX,
                Factory.forProtocol(lambda: _LinkFromWorker(events)))
        finally:
            # The reactor and the child hold their own copies.
            ours.close()
            theirs.close()
        return _Handle(transport)


# -- the worker's side ------------------------------------------------------------------


class _LinkToParent(NetstringReceiver):
    def __init__(self, link: ParentLink) -> None:
        self._link = link

    def connectionMade(self) -> None:
        self._link.connected(self)

    def stringReceived(self, string: bytes) -> None:
        """The parent sends nothing (yet)."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._link.lost()


class ParentLink:
    """A worker's end of the link: a L{emojistream.notify.Channel} to its parent, and
    the parent's end noticed (C{parent_gone} is called once)."""

    def __init__(self, reactor: Any, parent_gone: Callable[[], object],
                 fd: int = LINK_FD) -> None:
        self._reactor = reactor
        self._parent_gone = parent_gone
        self._fd = fd
        self._protocol: _LinkToParent | None = None
        self.gone = False
        self.closing = False

    def open(self) -> None:
        try:
            self._reactor.adoptStreamConnection(
                self._fd, socket.AF_UNIX, Factory.forProtocol(lambda: _LinkToParent(self)))
        except OSError:
            # No link: the parent is gone already, or this was not started by one.
            self.lost()
        finally:
            with suppress(OSError):
                os.close(self._fd)

    def connected(self, protocol: _LinkToParent) -> None:
        self._protocol = protocol

    def send(self, message: str) -> None:
        if self._protocol is not None:
            self._protocol.sendString(message.encode("utf-8"))

    def close(self) -> None:
        """The worker's stop has begun (its listeners are closed): the link stays open
        to the process's end, which the reactor's own shutdown closes."""
        self.closing = True

    def lost(self) -> None:
        self._protocol = None
        if not self.gone and not self.closing:
            self.gone = True
            self._parent_gone()
