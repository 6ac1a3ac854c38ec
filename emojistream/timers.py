"""A timer's call that survives its exceptions, written once: a C{TimerService} or
C{LoopingCall} whose call raises once stops for good, so every periodic job of the
daemon (the summary tick, reports, checks, the demo feeder) goes through L{SafeCall}."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger


class SafeCall:
    """Calls C{call}; an exception it raises is logged with its traceback ("C{what}
    failed", on C{log}, by default this class's own) and goes no further, so that the
    timer calls again at its next tick."""

    log = Logger()

    def __init__(self, call: Callable[..., object], what: str, log: Logger | None = None
                 ) -> None:
        self._call = call
        self._what = what
        if log is not None:
            self.log = log

    def __call__(self, *args: Any) -> None:
        try:
            self._call(*args)
        except Exception:
            self.log.failure("{what} failed", what=self._what)
