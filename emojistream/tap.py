"""The twistd plugin's options and C{makeService}: C{twistd -n emojistream [options]}."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from twisted.application.service import IService, Service
from twisted.logger import Logger

from emojistream.config import SPECS, ConfigError, Settings, resolve
from emojistream.endpoints import check_unshared, numbered, shared_port
from emojistream.lifecycle import ExitOnStartupError, Signals, StartupError, exit_after_stop
from emojistream.notify import Notifier
from emojistream.options import TableOptions, option_lists
from emojistream.service import daemon
from emojistream.supervisor import Supervisor
from emojistream.workers import ProcessLauncher, worker_number

_log = Logger(namespace="emojistream.tap")


class Options(TableOptions[Settings]):
    """Command-line options; each overrides its environment variable."""

    synopsis = "[options]"
    longdesc = (
        "Serves emojitracker's Redis pub/sub streams to browsers over Server-Sent Events. "
        "Every option can also be set through the environment variable named in its help."
    )
    specs = SPECS
    program = "emojistream"
    optParameters, optFlags = option_lists(SPECS)

    def settle(self, given: Mapping[str, str | None]) -> Settings:
        settings = resolve(self.environ, given)
        if worker_number(self.environ) is not None:
            # A worker never starts workers, whatever its environment says.
            settings = replace(settings, workers=1)
        if settings.workers > 1:
            check_workers(settings)
            if settings.event_ids and settings.source != "streams":
                # With a stream source every worker gives the stream's IDs and reads
                # what it lacks from Redis: a resume works on any of them.
                _log.warn("--event-ids with --workers {n}: each worker keeps its own "
                          "replay buffers and the kernel picks a worker per "
                          "connection, so most reconnections get the gap signal; "
                          "give each worker its own port behind sticky routing for "
                          "resumes to work", n=settings.workers)
        return settings


def makeService(options: Options, reactor: Any = None) -> IService:
    """The daemon's service tree, built from parsed options (with C{--workers N},
    a parent that runs N daemons)."""
    if reactor is None:
        from twisted.internet import reactor
    assert options.settings is not None
    if options.settings.workers > 1:
        return workers_daemon(options.settings, options.given, reactor, options.environ)
    return daemon(options.settings, reactor, options.environ)


def check_workers(settings: Settings) -> None:
    """Raise L{ConfigError} if C{--workers} cannot work with these settings."""
    if settings.demo and not settings.redis_given:
        raise ConfigError("--workers: each worker would start its own demo Redis; "
                          "start one and give --redis")
    try:
        shared_port(settings.listen)
        if settings.admin_listen:
            for number in (1, settings.workers):
                numbered(settings.admin_listen, number)
    except ValueError as e:
        raise ConfigError(f"--workers: {e}") from None


def worker_arguments(settings: Settings, given: Mapping[str, str | None], number: int
                     ) -> list[str]:
    """twistd arguments of worker C{number}: what was given, less C{--workers}, on the
    shared port, with its own admin endpoint, named C{<node>-<number>}. The rest of
    the environment reaches it as it is (L{emojistream.workers.worker_environment})."""
    args = ["emojistream"]
    derived = ("workers", "listen", "node", "admin_listen")
    for spec in SPECS:
        value = given.get(spec.key)
        if value is None or spec.key in derived:
            continue
        if spec.is_flag:
            args.append(f"--{spec.option}" if value == "true" else f"--no-{spec.option}")
        else:
            args += [f"--{spec.option}", value]
    args += ["--listen", shared_port(settings.listen), "--node", f"{settings.node}-{number}"]
    if settings.admin_listen:
        args += ["--admin-listen", numbered(settings.admin_listen, number)]
    return args


class _SharedPortCheck(Service):
    """Before any worker starts: the port the workers will share is not another
    process's (another tree's workers would take them into their group silently)."""

    def __init__(self, description: str) -> None:
        self._description = description

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            check_unshared(self._description)
        except OSError as e:
            raise StartupError(f"cannot listen on {self._description!r}: "
                               f"{e.strerror or e}") from None


def workers_daemon(settings: Settings, given: Mapping[str, str | None], reactor: Any,
                   environ: Mapping[str, str]) -> IService:
    """The parent of C{--workers N}: supervises the workers, alone tells systemd."""
    root = ExitOnStartupError()
    supervisor_signals = Signals(reactor)
    supervisor_signals.setServiceParent(root)
    _SharedPortCheck(shared_port(settings.listen)).setServiceParent(root)
    launcher = ProcessLauncher(reactor, lambda n: worker_arguments(settings, given, n),
                               environ)
    supervisor = Supervisor(settings.workers, launcher, clock=reactor,
                            halt=lambda why: exit_after_stop(reactor, 1),
                            stop_timeout=settings.drain + 10)
    supervisor.setServiceParent(root)
    supervisor_signals.reload = supervisor.reload
    notifier = Notifier.for_systemd(environ, clock=reactor,
                                    listening=supervisor.when_serving,
                                    status=supervisor.summary)
    if notifier is not None:
        # Added last, stopped first: STOPPING=1 goes as the stop begins.
        notifier.setServiceParent(root)
    return root
