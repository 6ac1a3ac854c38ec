"""The twistd plugin's options and C{makeService}: C{twistd -n emojistream [options]}."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from emojistream.config import SPECS, ConfigError, Settings, config_exit, resolve
from emojistream.endpoints import ReusePortEndpoint
from emojistream.lifecycle import ExitOnStartupError, SystemdNotifier, stop_cleanly_on_signals
from emojistream.service import daemon
from emojistream.workers import Workers

_log = Logger(namespace="emojistream.tap")


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
            if settings.workers > 1:
                check_workers(settings)
                if settings.event_ids:
                    _log.warn("--event-ids with --workers {n}: each worker keeps its own "
                              "replay buffers and the kernel picks a worker per "
                              "connection, so most reconnections get the gap signal; "
                              "give each worker its own port behind sticky routing for "
                              "resumes to work", n=settings.workers)
        except ConfigError as e:
            # Not a UsageError: twistd would print its whole option list before it.
            raise config_exit("twistd emojistream", e) from None
        #: What was given on the command line, by setting key (None: not given).
        self.given = given
        parent = getattr(self, "parent", None)
        if settings.log_format == "json" and parent is not None and not parent.get("logger"):
            # twistd turns this name into its log observer after our options are read.
            parent["logger"] = "emojistream.logs.json_stdout"
        self.settings = settings


def makeService(options: Options, reactor: Any = None) -> IService:
    """The daemon's service tree, built from parsed options (with C{--workers N},
    a parent that runs N daemons)."""
    if reactor is None:
        from twisted.internet import reactor
    assert options.settings is not None
    if options.settings.workers > 1:
        return workers_daemon(options.settings, options.given, reactor)
    return daemon(options.settings, reactor)


def check_workers(settings: Settings) -> None:
    """Raise L{ConfigError} if C{--workers} cannot work with these settings."""
    if settings.demo and not settings.redis_given:
        raise ConfigError("--workers: each worker would start its own demo Redis; "
                          "start one and give --redis")
    shared_port(settings.listen)


def shared_port(description: str) -> str:
    """The C{reuseport:} endpoint that workers share for a C{tcp:} or C{reuseport:}
    C{--listen}."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, ReusePortEndpoint):
        port, interface, backlog = endpoint.port, endpoint.interface, endpoint.backlog
    elif description.lower().startswith("tcp:"):
        port = getattr(endpoint, "_port", 0)
        interface = getattr(endpoint, "_interface", "")
        backlog = getattr(endpoint, "_backlog", 1024)
    else:
        raise ConfigError(f"--workers: {description!r} cannot be shared; give a tcp: or "
                          "reuseport: --listen")
    if not port:
        raise ConfigError("--workers: the workers share one port; name it (not 0)")
    where = f":interface={interface}" if interface else ""
    return f"reuseport:{port}{where}:backlog={backlog}"


def worker_arguments(settings: Settings, given: Mapping[str, str | None], number: int
                     ) -> list[str]:
    """twistd arguments of worker C{number}: what was given, less C{--workers}, on the
    shared port, named C{<node>-<number>}. The environment reaches it as it is."""
    args = ["--nodaemon", "--pidfile=", "emojistream"]
    for spec in SPECS:
        value = given.get(spec.key)
        if value is None or spec.key in ("workers", "listen", "node"):
            continue
        if spec.is_flag:
            args.append(f"--{spec.option}" if value == "true" else f"--no-{spec.option}")
        else:
            args += [f"--{spec.option}", value]
    args += ["--listen", shared_port(settings.listen), "--node", f"{settings.node}-{number}"]
    return args


def workers_daemon(settings: Settings, given: Mapping[str, str | None], reactor: Any
                   ) -> IService:
    """The parent of C{--workers N}: supervises the workers, tells systemd."""
    root = ExitOnStartupError()
    stop_cleanly_on_signals(reactor)
    workers = Workers(reactor, settings.workers,
                      lambda n: worker_arguments(settings, given, n),
                      stop_timeout=settings.drain + 10)
    # systemd hears from the parent alone (NotifyAccess=main), once all serve.
    notifier = SystemdNotifier.from_environment(
        os.environ, clock=reactor, listening=workers.when_serving, status=workers.summary)
    workers.setServiceParent(root)
    if notifier is not None:
        notifier.setServiceParent(root)
    return root
