"""twistd options made from a settings table (L{emojistream.config.Spec}): every
setting is an option and an environment variable, the option winning; a flag also
has its C{--no-} form; a bad value is one line and exit status 78, not twistd's
usage text. Shared by the daemon's plugin and the bridge's."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from twisted.python import usage

from emojistream.config import ConfigError, Spec, config_exit


class _Logged(Protocol):
    @property
    def log_format(self) -> str: ...


S = TypeVar("S", bound=_Logged)


def _describe(spec: Spec) -> str:
    extra = []
    if spec.env:
        extra.append(f"env {spec.env}")
    if spec.shown_default is not None:
        extra.append(f"default {spec.shown_default}")
    return f"{spec.help} [{', '.join(extra)}]" if extra else spec.help


def option_lists(specs: Sequence[Spec]) -> tuple[list[list[Any]], list[list[Any]]]:
    """twistd's C{optParameters} and C{optFlags} for C{specs}."""
    parameters = [[s.option, None, None, _describe(s)] for s in specs if not s.is_flag]
    flags = [
        flag
        for s in specs if s.is_flag
        for flag in (
            [[s.option, None, _describe(s)],
             [f"no-{s.option}", None, f"Turn --{s.option} off (overrides {s.env})"]]
            if s.env else [[s.option, None, s.help]]
        )
    ]
    return parameters, flags


class TableOptions(usage.Options, Generic[S]):
    """Options read through a settings table: a subclass names its C{specs}, its
    C{program} (for the one-line error) and how the given texts become its settings
    (L{settle})."""

    specs: ClassVar[Sequence[Spec]] = ()
    program: ClassVar[str] = ""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        #: The environment settings are read from (and child processes inherit).
        self.environ = os.environ if environ is None else environ
        #: What was given on the command line, by setting key (None: not given).
        self.given: dict[str, str | None] = {}
        self.settings: S | None = None

    def settle(self, given: Mapping[str, str | None]) -> S:
        """The settings from the environment and C{given}; raises L{ConfigError}."""
        raise NotImplementedError

    def postOptions(self) -> None:
        given: dict[str, str | None] = {}
        for spec in self.specs:
            if spec.is_flag:
                on, off = self[spec.option], self.get(f"no-{spec.option}")
                if on and off:
                    raise usage.UsageError(f"--{spec.option} and --no-{spec.option} "
                                           "contradict each other")
                given[spec.key] = "true" if on else "false" if off else None
            else:
                given[spec.key] = self[spec.option]
        try:
            settings = self.settle(given)
        except ConfigError as e:
            # Not a UsageError: twistd would print its whole option list before it.
            raise config_exit(f"twistd {self.program}", e) from None
        self.given = given
        parent = getattr(self, "parent", None)
        if settings.log_format == "json" and parent is not None and not parent.get("logger"):
            # twistd turns this name into its log observer after our options are read.
            parent["logger"] = "emojistream.logs.json_stdout"
        self.settings = settings
