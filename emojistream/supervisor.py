"""What the C{--workers N} parent decides about its workers, on any clock.

Each worker tells its parent what a daemon tells systemd (L{emojistream.notify}):
C{READY=1} once it listens, C{WATCHDOG=1} twice a second while its event loop turns,
C{STOPPING=1} once its listeners are closed and its drain begins. From that alone the
supervisor keeps N serving, as gunicorn's arbiter does:

 - a worker that ends is started again after a delay that doubles with each failure
   in a row (capped), and starts from the base delay again once one has served a while;
 - a worker that ends before it ever served, L{Supervisor.max_boot_failures} times in
   a row, stops the whole tree with one line (a setting that cannot work, a port taken):
   looping would only hide it from the service manager;
 - a worker silent for L{Supervisor.hang_timeout} seconds (stopped, or its loop stuck)
   is replaced at once, and woken and told to drain (so a stopped one still gives its
   clients their C{retry:} hint); if it does not begin to stop within
   L{Supervisor.hang_grace} seconds it is killed. One that does not start within the
   boot timeout is killed and started again;
 - a worker that begins to stop without being asked (someone signalled it) is replaced
   at once, while it drains;
 - L{Supervisor.reload} replaces the workers one at a time: each is told to stop, and
   once its listeners are closed a new one starts (new code, if the install changed);
   the next waits until that one serves.

Processes are the launcher's business (L{emojistream.workers}); this module only
decides, so it is tested on a C{Clock} with fake workers.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from emojistream.waiting import Waiters


class Handle(Protocol):
    """A started worker, as the launcher gives it back."""

    pid: int

    def signal(self, signum: int) -> None:
        """Send it C{signum}; nothing if it has ended."""


class Launcher(Protocol):
    """Starts worker C{number}; tells C{events} what it says and when it ends."""

    def launch(self, number: int, events: WorkerEvents) -> Handle: ...


class WorkerEvents(Protocol):
    """What the launcher reports of one started worker."""

    def notified(self, fields: dict[str, str]) -> None: ...

    def said(self, text: str) -> None: ...

    def ended(self, description: str) -> None: ...


@dataclass(eq=False)
class Worker:
    """One started worker process and what is known of it."""

    number: int
    started: float
    handle: Handle | None = None
    ready_at: float | None = None
    heard: float = 0.0
    status: str = ""
    #: Its stop has begun (it said STOPPING=1, or it was told to stop).
    stopping_since: float | None = None
    #: When it was told to stop because it was silent (it must say STOPPING soon).
    told_at: float | None = None
    #: Replaced already: its end starts nothing.
    retired: bool = False
    killed_for: str = ""
    last_words: str = ""
    ended: Deferred[None] = field(default_factory=Deferred)
    #: Who waits for it to be ready (True) or to end unready (False).
    _when_ready: Waiters[bool] = field(default_factory=Waiters)
    #: Who waits for it to begin its stop (or to end).
    _when_stopping: Waiters[None] = field(default_factory=Waiters)

    @property
    def pid(self) -> int:
        return self.handle.pid if self.handle is not None else 0

    def shift(self, seconds: float, now: float) -> None:
        """Move its clocks C{seconds} on (to C{now} at most): a stall of the parent's
        own is not counted against it."""
        for name in ("started", "heard", "stopping_since", "told_at"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, min(value + seconds, now))


class _Events:
    """Binds the launcher's reports of one worker to the supervisor."""

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self._supervisor = supervisor
        self._worker = worker

    def notified(self, fields: dict[str, str]) -> None:
        self._supervisor.notified(self._worker, fields)

    def said(self, text: str) -> None:
        self._worker.last_words = text

    def ended(self, description: str) -> None:
        self._supervisor.worker_ended(self._worker, description)


class Supervisor(Service):
    """Keeps C{count} workers serving; see the module docstring.

    @param halt: called once, with one line, when the tree must stop for good.
    """

    log = Logger()
    #: Seconds between the supervisor's looks at its workers.
    CHECK_INTERVAL = 0.5
    #: A look this much later than the one before means the parent itself stalled.
    STALL = 2.0

    def __init__(self, count: int, launcher: Launcher, *, clock: Any,
                 halt: Callable[[str], object], restart_delay: float = 0.5,
                 max_restart_delay: float = 30.0, stable_after: float = 30.0,
                 max_boot_failures: int = 3, boot_timeout: float = 60.0,
                 hang_timeout: float = 5.0, hang_grace: float = 2.0,
                 stop_timeout: float = 70.0) -> None:
        self.count = count
        self._launcher = launcher
        self._clock = clock
        self._halt = halt
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.stable_after = stable_after
        self.max_boot_failures = max_boot_failures
        self.boot_timeout = boot_timeout
        self.hang_timeout = hang_timeout
        self.hang_grace = hang_grace
        self.stop_timeout = stop_timeout
        #: The worker in each place (1 to count), serving or starting.
        self.current: dict[int, Worker] = {}
        #: Workers replaced or stopping, until they end.
        self.leaving: set[Worker] = set()
        self._failures: dict[int, int] = {}
        self._boot_failures: dict[int, int] = {}
        self._pending: dict[int, Any] = {}
        self._ready_waiters: Waiters[None] = Waiters()
        self._checker = LoopingCall(self.check)
        self._checker.clock = clock
        self._last_check: float | None = None
        self._reloading = False
        self.halted = ""
        #: Workers that ended and were started again, since start.
        self.restarts = 0

    # -- starting and stopping ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for number in range(1, self.count + 1):
            self._launch(number)
        self._checker.start(self.CHECK_INTERVAL, now=False)

    def _launch(self, number: int) -> Worker:
        self._pending.pop(number, None)
        worker = Worker(number, started=self._clock.seconds())
        self.current[number] = worker
        worker.handle = self._launcher.launch(number, _Events(self, worker))
        self.log.info("Started worker {n} (pid {pid})", n=number, pid=worker.pid)
        return worker

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for call in self._pending.values():
            call.cancel()
        self._pending.clear()
        workers = [*self.current.values(), *self.leaving]
        for worker in workers:
            self._stop(worker)

        def ended(result: object) -> object:
            # Checks go on until then: a worker that does not finish its drain is killed.
            if self._checker.running:
                self._checker.stop()
            return result

        return DeferredList([w.ended for w in workers]).addBoth(ended)

    def _stop(self, worker: Worker) -> None:
        """Tell C{worker} to drain and end (SIGTERM); it is killed past the timeout."""
        if worker.stopping_since is None:
            worker.stopping_since = self._clock.seconds()
        worker.retired = True
        if worker.handle is not None:
            worker.handle.signal(signal.SIGTERM)

    # -- what workers say -----------------------------------------------------------

    def notified(self, worker: Worker, fields: dict[str, str]) -> None:
        now = self._clock.seconds()
        worker.heard = now
        if "STATUS" in fields:
            worker.status = fields["STATUS"]
        if fields.get("READY") == "1" and worker.ready_at is None:
            worker.ready_at = now
            self._boot_failures[worker.number] = 0
            worker._when_ready.fire(True)
            self._maybe_all_serving()
        if fields.get("STOPPING") == "1":
            first = worker.stopping_since is None
            if first:
                worker.stopping_since = now
            worker._when_stopping.fire(None)
            if (self.running and not worker.retired
                    and self.current.get(worker.number) is worker):
                # Signalled by someone else: it drains, a new one takes its place.
                self.log.info("Worker {n} (pid {pid}) is stopping; starting its "
                              "replacement", n=worker.number, pid=worker.pid)
                self._retire(worker)
                self.restarts += 1
                self._launch(worker.number)

    def _retire(self, worker: Worker) -> None:
        worker.retired = True
        self.leaving.add(worker)
        if self.current.get(worker.number) is worker:
            del self.current[worker.number]

    def worker_ended(self, worker: Worker, description: str) -> None:
        now = self._clock.seconds()
        self.leaving.discard(worker)
        worker._when_ready.fire(False)
        worker._when_stopping.fire(None)
        replace = self.running and not worker.retired and self.current.get(worker.number) is worker
        if replace:
            del self.current[worker.number]
        worker.ended.callback(None)
        if not replace:
            self.log.info("Worker {n} (pid {pid}) ended ({why})", n=worker.number,
                          pid=worker.pid, why=description)
            return
        why = worker.killed_for or description
        if worker.ready_at is None:
            failed = self._boot_failures.get(worker.number, 0) + 1
            self._boot_failures[worker.number] = failed
            last = f": {worker.last_words}" if worker.last_words else ""
            if failed >= self.max_boot_failures:
                self.halt(f"worker {worker.number} failed to start {failed} times in a "
                          f"row ({why}{last}); stopping all workers")
                return
        elif now - worker.ready_at >= self.stable_after:
            self._failures[worker.number] = 0
        failures = self._failures.get(worker.number, 0) + 1
        self._failures[worker.number] = failures
        delay = min(self.max_restart_delay, self.restart_delay * 2 ** (failures - 1))
        self.restarts += 1
        self.log.warn("Worker {n} (pid {pid}) ended ({why}); starting it again in "
                      "{s:g} s", n=worker.number, pid=worker.pid, why=why, s=delay)
        self._pending[worker.number] = self._clock.callLater(delay, self._launch,
                                                             worker.number)

    def halt(self, why: str) -> None:
        """Stop the tree for good, once, with one line."""
        if self.halted:
            return
        self.halted = why
        self.log.critical("{why}", why=why)
        self._halt(why)

    # -- watching -------------------------------------------------------------------

    def check(self) -> None:
        """Replace workers that hang or never start; kill those that do not stop."""
        now = self._clock.seconds()
        last, self._last_check = self._last_check, now
        if last is not None and now - last > self.STALL:
            # The parent itself did not run (stopped, or its loop stuck): the workers'
            # heartbeats wait unread in their links. Judge them from now on.
            self.log.warn("The parent did not run for {s:.1f} s; judging its workers "
                          "from now", s=now - last)
            stalled = now - last - self.CHECK_INTERVAL
            for worker in [*self.current.values(), *self.leaving]:
                worker.shift(stalled, now)
            return
        for worker in list(self.current.values()) if self.running else ():
            if worker.stopping_since is not None or worker.killed_for:
                continue
            if worker.ready_at is None and now - worker.started > self.boot_timeout:
                self._kill(worker, f"not serving {self.boot_timeout:g} s after its start")
            elif worker.ready_at is not None and now - worker.heard > self.hang_timeout:
                self._replace_silent(worker, now)
        for worker in [*self.current.values(), *self.leaving]:
            if worker.killed_for:
                continue
            if worker.told_at is not None and worker.stopping_since is None \
                    and now - worker.told_at > self.hang_grace:
                self._kill(worker, f"silent, and not stopping {self.hang_grace:g} s after "
                                   "it was told to")
            elif (worker.stopping_since is not None
                    and now - worker.stopping_since > self.stop_timeout):
                self._kill(worker, f"still draining {self.stop_timeout:g} s after its stop")

    def _replace_silent(self, worker: Worker, now: float) -> None:
        """A worker whose loop has not turned for a while gets a new one in its place,
        and is woken (if stopped) and told to drain; it is killed if it cannot."""
        self.log.warn("Worker {n} (pid {pid}) silent for {s:.1f} s: replacing it",
                      n=worker.number, pid=worker.pid, s=now - worker.heard)
        self._retire(worker)
        worker.told_at = now
        if worker.handle is not None:
            worker.handle.signal(signal.SIGCONT)
            worker.handle.signal(signal.SIGTERM)
        self.restarts += 1
        self._launch(worker.number)

    def _kill(self, worker: Worker, why: str) -> None:
        worker.killed_for = f"killed: {why}"
        self.log.warn("Worker {n} (pid {pid}) {why}: killing it", n=worker.number,
                      pid=worker.pid, why=why)
        if worker.handle is not None:
            worker.handle.signal(signal.SIGKILL)

    def serving(self) -> list[Worker]:
        """Workers serving now: ready, heard from lately, not stopping."""
        now = self._clock.seconds()
        return [w for w in self.current.values()
                if w.ready_at is not None and w.stopping_since is None
                and not w.killed_for and now - w.heard <= 2 * self.CHECK_INTERVAL + 1]

    def _maybe_all_serving(self) -> None:
        if len(self.serving()) == self.count:
            self._ready_waiters.fire(None)

    def when_serving(self) -> Deferred[None]:
        """Fires once every worker serves (for systemd's READY=1)."""
        if len(self.serving()) == self.count:
            return succeed(None)
        return self._ready_waiters.wait()

    def summary(self) -> str:
        """One line for a service manager's status: how many serve, and each worker."""
        serving = self.serving()
        parts = [f"{len(serving)} of {self.count} workers serving, {self.restarts} restarts"]
        if self.halted:
            parts.append(f"halted: {self.halted}")
        for number in sorted(self.current):
            worker = self.current[number]
            if worker in serving:
                parts.append(f"worker {number}: {worker.status}")
            elif worker.ready_at is None:
                parts.append(f"worker {number}: starting")
            else:
                parts.append(f"worker {number}: not responding")
        return "; ".join(parts)

    # -- rolling restart ------------------------------------------------------------

    def reload(self) -> Deferred[None]:
        """Replace every worker, one at a time, each draining; see the module
        docstring. A reload asked for while one runs is ignored."""
        if self._reloading or not self.running:
            self.log.info("A rolling restart is under way already" if self._reloading
                          else "Not running: nothing to restart")
            return succeed(None)
        self._reloading = True
        d = self._roll()

        def done(result: object) -> object:
            self._reloading = False
            return result

        return d.addBoth(done)

    @inlineCallbacks
    def _roll(self) -> Any:
        self.log.info("Rolling restart of {n} workers", n=self.count)
        for number in range(1, self.count + 1):
            old = self.current.get(number)
            if not self.running:
                return
            if old is not None:
                self._retire(old)
                # One that never became ready has nothing to drain: go on at once.
                stopping = (old._when_stopping.wait() if old.ready_at is not None
                            else succeed(None))
                self._stop(old)
                yield stopping
            if not self.running:
                return
            self._pending.pop(number, None)
            if number in self.current:
                # Started meanwhile by the ordinary restart.
                new = self.current[number]
            else:
                self.restarts += 1
                new = self._launch(number)
            if new.ready_at is None:
                served = yield new._when_ready.wait()
                if not served:
                    self.log.warn("Rolling restart stopped: worker {n} did not start",
                                  n=number)
                    return
        self.log.info("Rolling restart done: {n} new workers serving", n=self.count)

