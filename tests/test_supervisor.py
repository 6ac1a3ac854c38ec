"""The --workers parent's decisions on a Clock, with fake workers: restarts that back
off, a tree that stops when a worker cannot start, silent workers replaced, rolling
restarts one at a time."""

from __future__ import annotations

import signal

from twisted.internet.task import Clock

from emojistream.supervisor import Supervisor, WorkerEvents


class FakeWorker:
    def __init__(self, number: int, pid: int, events: WorkerEvents) -> None:
        self.number = number
        self.pid = pid
        self.events = events
        self.signals: list[int] = []
        self.ended = False

    def signal(self, signum: int) -> None:
        self.signals.append(signum)

    def ready(self) -> None:
        self.events.notified({"READY": "1", "STATUS": f"{self.number} streams"})

    def beat(self) -> None:
        self.events.notified({"WATCHDOG": "1", "STATUS": f"{self.number} streams"})

    def stopping(self) -> None:
        self.events.notified({"STOPPING": "1"})

    def end(self, why: str = "exit code 1") -> None:
        self.ended = True
        self.events.ended(why)


class FakeLauncher:
    def __init__(self) -> None:
        self.started: list[FakeWorker] = []

    def launch(self, number: int, events: WorkerEvents) -> FakeWorker:
        worker = FakeWorker(number, 1000 + len(self.started), events)
        self.started.append(worker)
        return worker

    def of(self, number: int) -> list[FakeWorker]:
        return [w for w in self.started if w.number == number]

    def alive(self) -> list[FakeWorker]:
        return [w for w in self.started if not w.ended]


def started(count: int = 2, **kwargs: float) -> tuple[Supervisor, FakeLauncher, Clock,
                                                     list[str]]:
    clock, launcher, halts = Clock(), FakeLauncher(), []
    supervisor = Supervisor(count, launcher, clock=clock, halt=halts.append, **kwargs)
    supervisor.startService()
    return supervisor, launcher, clock, halts


def beat_all(launcher: FakeLauncher, clock: Clock, seconds: float,
             skip: tuple[FakeWorker, ...] = ()) -> None:
    """Let C{seconds} pass with every live worker (but C{skip}) beating twice a second."""
    for _ in range(int(seconds * 2)):
        clock.advance(0.5)
        for worker in launcher.alive():
            if worker not in skip:
                worker.beat()


def test_restarts_back_off_exponentially_up_to_a_cap_and_reset_after_serving_a_while():
    supervisor, launcher, clock, halts = started(1, restart_delay=1, max_restart_delay=8,
                                                 stable_after=30)
    delays = []
    for _ in range(6):
        worker = launcher.started[-1]
        worker.ready()
        worker.end()
        before = len(launcher.started)
        waited = 0.0
        while len(launcher.started) == before:
            clock.advance(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays == [1, 2, 4, 8, 8, 8]
    # One that served longer than stable_after starts again after the base delay.
    worker = launcher.started[-1]
    worker.ready()
    beat_all(launcher, clock, 31)
    worker.end()
    clock.advance(1)
    assert len(launcher.started) == 8
    assert halts == [] and supervisor.restarts == 7


def test_a_worker_that_fails_to_start_three_times_in_a_row_halts_the_tree_once():
    supervisor, launcher, clock, halts = started(2)
    launcher.of(1)[0].ready()
    for _ in range(3):
        worker = launcher.of(2)[-1]
        worker.events.said("emojistream: cannot listen on 'tcp:8002': Address already in use")
        worker.end("exit code 1")
        beat_all(launcher, clock, 60)
    assert len(launcher.of(2)) == 3
    assert halts == ["worker 2 failed to start 3 times in a row (exit code 1: emojistream: "
                     "cannot listen on 'tcp:8002': Address already in use); stopping all "
                     "workers"]
    # A halt is said once; stopping the tree stops every worker that is left.
    supervisor.stopService()
    assert launcher.of(1)[0].signals == [signal.SIGTERM]
    assert len(halts) == 1


def test_a_boot_failure_count_resets_once_the_worker_serves():
    _supervisor, launcher, clock, halts = started(1)
    for _ in range(5):
        launcher.started[-1].end()
        clock.advance(60)
        launcher.started[-1].end()
        clock.advance(60)
        launcher.started[-1].ready()
        launcher.started[-1].end()
        clock.advance(60)
    assert halts == []


def test_a_silent_worker_is_replaced_woken_and_told_to_drain_then_killed_if_it_cannot():
    supervisor, launcher, clock, _halts = started(2, hang_timeout=5, hang_grace=2)
    first, second = launcher.started
    first.ready()
    second.ready()
    assert "2 of 2 workers serving" in supervisor.summary()
    beat_all(launcher, clock, 3, skip=(second,))
    assert supervisor.summary().startswith("1 of 2 workers serving")
    assert "worker 2: not responding" in supervisor.summary()
    beat_all(launcher, clock, 3, skip=(second,))
    # Replaced at once; the silent one is woken (it may be stopped) and told to drain.
    assert second.signals == [signal.SIGCONT, signal.SIGTERM]
    replacement = launcher.of(2)[-1]
    assert replacement is not second
    replacement.ready()
    assert "2 of 2 workers serving" in supervisor.summary()
    # It never says STOPPING: killed after the grace period.
    beat_all(launcher, clock, 2.5, skip=(second,))
    assert second.signals[-1] == signal.SIGKILL
    second.end("killed by SIGKILL")
    clock.advance(5)
    assert len(launcher.of(2)) == 2


def test_a_silent_worker_that_begins_to_drain_is_given_its_drain():
    _supervisor, launcher, clock, _halts = started(1, hang_timeout=5, hang_grace=2,
                                                  stop_timeout=20)
    stuck = launcher.started[0]
    stuck.ready()
    clock.advance(6)
    assert stuck.signals == [signal.SIGCONT, signal.SIGTERM]
    stuck.stopping()
    beat_all(launcher, clock, 10, skip=(stuck,))
    assert signal.SIGKILL not in stuck.signals
    beat_all(launcher, clock, 11, skip=(stuck,))
    assert stuck.signals[-1] == signal.SIGKILL


def test_a_worker_signalled_by_someone_else_is_replaced_while_it_drains():
    supervisor, launcher, clock, _halts = started(2)
    for worker in launcher.started:
        worker.ready()
    leaving = launcher.of(1)[0]
    leaving.stopping()
    assert len(launcher.of(1)) == 2
    leaving.end("exit code 0")
    beat_all(launcher, clock, 60)
    # Its end starts nothing more.
    assert len(launcher.of(1)) == 2 and supervisor.restarts == 1


def test_a_rolling_restart_replaces_one_worker_at_a_time():
    supervisor, launcher, clock, _halts = started(2)
    old1, old2 = launcher.started
    old1.ready()
    old2.ready()
    done = supervisor.reload()
    assert old1.signals == [signal.SIGTERM] and old2.signals == []
    assert len(launcher.started) == 2
    old1.stopping()
    new1 = launcher.of(1)[-1]
    assert new1 is not old1 and old2.signals == []
    new1.ready()
    assert old2.signals == [signal.SIGTERM]
    # A second reload while one runs is ignored.
    supervisor.reload()
    old2.stopping()
    new2 = launcher.of(2)[-1]
    new2.ready()
    assert done.called
    old1.end("exit code 0")
    old2.end("exit code 0")
    beat_all(launcher, clock, 60)
    assert len(launcher.started) == 4
    assert [w.signals for w in (new1, new2)] == [[], []]


def test_a_rolling_restart_over_a_worker_not_yet_ready_goes_on_and_its_end_is_heard():
    # Its stop was waited for and fired by hand too: its end fired it again, and the
    # AlreadyCalledError that raised kept the supervisor from hearing of the end.
    supervisor, launcher, _clock, _halts = started(1)
    [old] = launcher.started
    done = supervisor.reload()
    assert old.signals == [signal.SIGTERM]
    new = launcher.of(1)[-1]
    assert new is not old
    old.end("exit code 0")
    assert not supervisor.leaving
    new.ready()
    assert done.called
    stopped = supervisor.stopService()
    new.end("exit code 0")
    assert stopped.called


def test_ready_waits_for_every_worker_and_stop_kills_those_past_the_timeout():
    supervisor, launcher, clock, _halts = started(2, stop_timeout=5)
    ready = supervisor.when_serving()
    launcher.started[0].ready()
    assert not ready.called
    launcher.started[1].ready()
    assert ready.called
    stopped = supervisor.stopService()
    assert all(w.signals == [signal.SIGTERM] for w in launcher.started)
    launcher.started[0].stopping()
    launcher.started[0].end("exit code 0")
    beat_all(launcher, clock, 6, skip=tuple(launcher.started))
    assert launcher.started[1].signals[-1] == signal.SIGKILL
    assert not stopped.called
    launcher.started[1].end("killed by SIGKILL")
    assert stopped.called
    clock.advance(60)
    assert len(launcher.started) == 2


def test_a_stall_of_the_parents_own_is_not_blamed_on_its_workers():
    supervisor, launcher, clock, _halts = started(2, hang_timeout=5)
    for worker in launcher.started:
        worker.ready()
    beat_all(launcher, clock, 2)
    # The parent stopped for 8 s (SIGSTOP): its checker runs once, late, before it has
    # read the heartbeats waiting in the links.
    clock.advance(8)
    assert all(w.signals == [] for w in launcher.started) and len(launcher.started) == 2
    beat_all(launcher, clock, 10)
    assert all(w.signals == [] for w in launcher.started) and len(launcher.started) == 2
    # A worker silent while the parent runs is still replaced.
    first = launcher.started[0]
    beat_all(launcher, clock, 6, skip=(first,))
    assert first.signals == [signal.SIGCONT, signal.SIGTERM]
    assert supervisor.restarts == 1
