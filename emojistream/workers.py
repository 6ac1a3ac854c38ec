"""Several worker processes on one port, from one command: C{--workers N}.

The parent runs no streams itself. It starts N C{twistd -n emojistream} children,
each with its own C{reuseport:} socket on the same port (the kernel spreads new
connections over them), its own Redis subscription and summarizer, and its own node
name (C{<node>-<i>}). A child that dies is replaced; on SIGTERM every child is told
to stop, drains its streams, and the parent exits once all have.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

#: How a child starts twistd: the same interpreter, so the same installation.
RUN_TWISTD = "from twisted.scripts.twistd import run; run()"
#: A child's log line that says it is serving.
SERVING = b"Serving HTTP on "


class _Child(ProcessProtocol):
    """One worker: passes its output on whole lines at a time, notices it serving."""

    def __init__(self, owner: Workers, number: int) -> None:
        self._owner = owner
        self.number = number
        self._partial = b""
        self.serving = False
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        lines, _, self._partial = (self._partial + data).rpartition(b"\n")
        if lines:
            if not self.serving and SERVING in lines:
                self.serving = True
                self._owner.child_serving(self)
            self._owner.write_log(lines + b"\n")

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self._owner.write_log(self._partial + b"\n")
        self.ended.callback(None)
        self._owner.child_ended(self, reason)


class Workers(Service):
    """Keeps C{count} worker processes running; see the module docstring.

    @param arguments: the twistd arguments of worker number C{i} (from 1).
    """

    log = Logger()

    def __init__(self, reactor: Any, count: int, arguments: Callable[[int], Sequence[str]],
                 *, environ: dict[str, str] | None = None, restart_delay: float = 1.0,
                 stop_timeout: float = 60.0,
                 write_log: Callable[[bytes], object] | None = None) -> None:
        self._reactor = reactor
        self._count = count
        self._arguments = arguments
        self._environ = dict(os.environ if environ is None else environ)
        self._restart_delay = restart_delay
        self._stop_timeout = stop_timeout
        self._write = write_log or (lambda data: os.write(1, data))
        self.children: dict[int, _Child] = {}
        self._transports: dict[int, Any] = {}
        self._ready: list[Deferred[None]] = []
        #: Workers that died and were started again, since start.
        self.restarts = 0

    def startService(self) -> None:
        super().startService()
        for number in range(1, self._count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        if not self.running:
            return
        child = _Child(self, number)
        args = [sys.executable, "-c", RUN_TWISTD, *self._arguments(number)]
        self.children[number] = child
        self._transports[number] = self._reactor.spawnProcess(
            child, sys.executable, args, env=self._environ)
        self.log.info("Started worker {n} (pid {pid})", n=number,
                      pid=self._transports[number].pid)

    def write_log(self, data: bytes) -> None:
        """A worker's log lines, passed on as they are (text or JSON lines)."""
        self._write(data)

    def child_serving(self, child: _Child) -> None:
        if self.serving == self._count:
            waiting, self._ready = self._ready, []
            for d in waiting:
                d.callback(None)

    @property
    def serving(self) -> int:
        """How many workers are serving now."""
        return sum(c.serving for c in self.children.values())

    def when_serving(self) -> Deferred[None]:
        """Fires once every worker is serving (for systemd's READY=1)."""
        if self.serving == self._count:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready.append(d)
        return d

    def summary(self) -> str:
        """One line for a service manager's status."""
        return f"{self.serving} of {self._count} workers serving, {self.restarts} restarts"

    def child_ended(self, child: _Child, reason: Failure) -> None:
        if self.children.get(child.number) is not child:
            return
        del self.children[child.number]
        self._transports.pop(child.number, None)
        if self.running:
            self.restarts += 1
            self.log.warn("Worker {n} ended ({why}); starting it again in {s:g} s",
                          n=child.number, why=reason.getErrorMessage(),
                          s=self._restart_delay)
            self._reactor.callLater(self._restart_delay, self._spawn, child.number)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ending = [child.ended for child in self.children.values()]
        for transport in list(self._transports.values()):
            self._signal(transport, signal.SIGTERM)
            # A worker that does not finish its drain in time is killed.
            self._reactor.callLater(self._stop_timeout, self._signal, transport,
                                    signal.SIGKILL)
        return DeferredList(ending)

    @staticmethod
    def _signal(transport: Any, signum: int) -> None:
        with suppress(ProcessExitedAlready):
            transport.signalProcess(signum)
