"""The daemon's signal handlers: installed before anything listens, and again in the
same start-up phase as the reactor's own, so that no SIGTERM ever meets the reactor's
handler (which would end the process killed by the signal, not with status 0)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from emojistream.lifecycle import Signals


class StartingReactor:
    """Records system event triggers; not running yet."""

    running = False

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, Callable[[], object]]] = []

    def addSystemEventTrigger(self, phase: str, event: str, call: Callable[[], object]
                              ) -> None:
        self.triggers.append((phase, event, call))

    def callWhenRunning(self, call: Callable[[], object]) -> None:
        self.triggers.append(("after", "startup", call))

    def callFromThread(self, call: Callable[..., object], *args: Any) -> None:
        call(*args)


@pytest.fixture
def saved_handlers() -> Iterator[None]:
    names = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    saved = {n: signal.getsignal(n) for n in names}
    try:
        yield
    finally:
        for n, handler in saved.items():
            signal.signal(n, handler)


def test_handlers_are_installed_before_listening_and_again_during_startup(saved_handlers):
    reactor = StartingReactor()
    signals = Signals(reactor)
    signals.privilegedStartService()
    ours = signal.getsignal(signal.SIGTERM)
    assert getattr(ours, "__self__", None) is signals
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        assert getattr(signal.getsignal(number), "__self__", None) is signals
    # The reactor puts its own SIGTERM handler in place "during startup"; ours follows
    # in that phase, before anything of "after startup" runs.
    assert [(phase, event) for phase, event, _ in reactor.triggers] == [("during", "startup")]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    reactor.triggers[0][2]()
    assert getattr(signal.getsignal(signal.SIGTERM), "__self__", None) is signals


def test_hup_without_workers_is_logged_and_reload_is_called_with_them(saved_handlers):
    reactor = StartingReactor()
    reloads: list[bool] = []
    signals = Signals(reactor)
    signals.privilegedStartService()
    signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
    assert reloads == []
    signals.reload = lambda: reloads.append(True)
    signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
    assert reloads == [True]
