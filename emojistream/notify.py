"""sd_notify's words (C{READY=1}, C{WATCHDOG=1}, C{STATUS=}, C{STOPPING=1}) told to a
service manager: systemd over its C{NOTIFY_SOCKET}, or a C{--workers} parent over the
link it gave its worker. The same notifier serves both, so a worker proves its event
loop turns exactly as a single daemon proves it to systemd."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

def parse_notification(text: str) -> dict[str, str]:
    """The fields of one notification (C{KEY=VALUE} lines)."""
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class Channel(Protocol):
    """Where notifications go: opened when the notifier starts, closed when it stops."""

    def open(self) -> None: ...

    def send(self, message: str) -> None: ...

    def close(self) -> None: ...


class SystemdSocket:
    """systemd's notification socket (a datagram socket; C{@name} is abstract)."""

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._failed = False

    def open(self) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def send(self, message: str) -> None:
        """Send one notification; a failure is logged once and never raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode("utf-8"), self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warn("Cannot notify systemd at {address}: {e}", address=self.address,
                         e=e)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def systemd_watchdog(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings systemd asks of process C{pid}: half of
    C{WATCHDOG_USEC}, as sd_watchdog_enabled(3) advises; None if it asks none."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID")
    if usec.isdigit() and int(usec) > 0 and owner in (None, str(pid)):
        return int(usec) / 2e6
    return None


class Notifier(Service):
    """Tells a service manager how the daemon is doing: C{READY=1} once it listens,
    C{WATCHDOG=1} from a reactor timer (only a turning reactor keeps the watchdog
    quiet), C{STATUS=} with how it goes, and C{STOPPING=1} when the stop begins."""

    def __init__(self, channel: Channel, *, clock: Any,
                 listening: Callable[[], Deferred[Any]], status: Callable[[], str],
                 watchdog: float | None = None) -> None:
        self.channel = channel
        self._clock = clock
        self._listening = listening
        self._status = status
        self._watchdog = watchdog
        self._timer: LoopingCall | None = None
        self.ready = False

    @classmethod
    def for_systemd(cls, environ: Mapping[str, str], **kwargs: Any) -> Notifier | None:
        """A notifier for the socket systemd named, or None outside systemd. Reads the
        environment only: children are kept from it where they are spawned."""
        address = environ.get("NOTIFY_SOCKET")
        if not address:
            return None
        return cls(SystemdSocket(address), watchdog=systemd_watchdog(environ, os.getpid()),
                   **kwargs)

    def notify(self, message: str) -> None:
        self.channel.send(message)

    def startService(self) -> None:
        super().startService()
        self.channel.open()
        self._listening().addCallback(self._ready)
        if self._watchdog is not None:
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
        self.channel.close()
