"""The twistd plugin's options and C{makeService}: C{twistd -n emojistream [options]}."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

from twisted.application.service import IService
from twisted.python import usage

from emojistream.config import SPECS, ConfigError, Settings, resolve
from emojistream.service import daemon


def _describe(spec_help: str, default: str | None, env: str | None) -> str:
    extra = []
    if env:
        extra.append(f"env {env}")
    if default is not None:
        extra.append(f"default {default}")
    return f"{spec_help} [{', '.join(extra)}]" if extra else spec_help


class Options(usage.Options):
    """Command-line options; each overrides its environment variable."""

    synopsis = "[options]"
    longdesc = (
        "Serves emojitracker's Redis pub/sub streams to browsers over Server-Sent Events. "
        "Every option can also be set through the environment variable named in its help."
    )

    optParameters: ClassVar[list[list[Any]]] = [
        [s.option, None, None, _describe(s.help, s.default, s.env)]
        for s in SPECS if not s.is_flag
    ]
    optFlags: ClassVar[list[list[Any]]] = [
        flag
        for s in SPECS if s.is_flag
        for flag in (
            [[s.option, None, _describe(s.help, s.default, s.env)],
             [f"no-{s.option}", None, f"Turn --{s.option} off (overrides {s.env})"]]
            if s.env else [[s.option, None, s.help]]
        )
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self.settings: Settings | None = None

    def postOptions(self) -> None:
        given: dict[str, str | None] = {}
        for spec in SPECS:
            if spec.is_flag:
                on, off = self[spec.option], self.get(f"no-{spec.option}")
                if on and off:
                    raise usage.UsageError(f"--{spec.option} and --no-{spec.option} "
                                           "contradict each other")
                given[spec.key] = "true" if on else "false" if off else None
            else:
                given[spec.key] = self[spec.option]
        try:
            settings = resolve(self._environ, given)
        except ConfigError as e:
            # Not a UsageError: twistd would print its whole option list before it.
            raise SystemExit(f"twistd emojistream: {e}") from None
        parent = getattr(self, "parent", None)
        if settings.log_format == "json" and parent is not None and not parent.get("logger"):
            # twistd turns this name into its log observer after our options are read.
            parent["logger"] = "emojistream.logs.json_stdout"
        self.settings = settings


def makeService(options: Options, reactor: Any = None) -> IService:
    """The daemon's service tree, built from parsed options."""
    if reactor is None:
        from twisted.internet import reactor
    assert options.settings is not None
    return daemon(options.settings, reactor)
