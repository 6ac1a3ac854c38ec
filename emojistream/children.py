"""Child processes the daemon starts (its workers, the demo's redis-server) and what
they must not inherit: they end with their parent, and systemd's variables are the
parent's alone."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

#: What systemd gives a service, and only the process it started may use.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                     "LISTEN_PID", "LISTEN_FDNAMES")

#: Asks the kernel for SIGTERM when the parent (argument 1) ends (PR_SET_PDEATHSIG
#: lasts across exec), gives up if it has ended already, then runs the command.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0); "
    "os.getppid() == int(sys.argv[1]) or sys.exit('parent ended before the child began'); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def die_with_parent(command: Sequence[str], parent_pid: int) -> list[str]:
    """A command line that runs C{command} and has the kernel end it (SIGTERM) when
    process C{parent_pid}, which starts it, ends by any cause: no orphan outlives a
    daemon killed with SIGKILL."""
    return [sys.executable, "-P", "-c", _DIE_WITH_PARENT, str(parent_pid), *command]


def child_environment(environ: Mapping[str, str], *, drop: Sequence[str] = ()
                      ) -> dict[str, str]:
    """A child's environment: the parent's, less systemd's variables and C{drop}."""
    return {k: v for k, v in environ.items() if k not in SYSTEMD_VARIABLES and k not in drop}
