"""The daemon as operators run it: `twistd -n emojistream ...` in a child process."""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import REPO, repo_env

TWISTD = str(Path(sys.executable).parent / "twistd")


def twistd(*args: str, env: dict[str, str] | None = None, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion (for commands expected to exit by themselves)."""
    full_env = repo_env()
    full_env.update(env or {})
    return subprocess.run([TWISTD, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)


class TwistdProcess:
    """A running `twistd -n` child whose log is collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 open_files: int | None = None,
                 restrict: Callable[[], object] | None = None) -> None:
        full_env = repo_env()
        full_env.update(env or {})

        def limit_files() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
            if restrict is not None:
                restrict()  # in the child, before exec (as systemd applies a unit's)

        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile=-", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
            cwd=REPO, preexec_fn=limit_files,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """Block until a log line matches C{pattern}; fail if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and seen == len(self.lines)):
                    raise AssertionError(f"no log line matching {pattern!r}:\n" + self.log())
                self._changed.wait(min(left, 0.5))

    def wait_for_lines(self, pattern: str, n: int, timeout: float = 30) -> None:
        """Block until C{n} log lines match C{pattern}; fail if the process exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(bool(regex.search(line)) for line in self.lines) < n:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"fewer than {n} lines matching {pattern!r}:\n"
                                         + self.log())
                self._changed.wait(min(left, 0.5))

    def port(self) -> int:
        """The HTTP port, from the web service's start-up log line."""
        return int(self.wait_for_line(r"Serving HTTP on \S*:(\d+)").group(1))

    def log(self) -> str:
        return "\n".join(self.lines)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def children(self) -> list[int]:
        """PIDs of this process's direct children."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except FileNotFoundError:
            return []


def serve_briefly(*args: str, env: dict[str, str] | None = None) -> TwistdProcess:
    """Run `twistd -n` until it serves and is subscribed to Redis, then stop it; the
    exit must be 0. Returns the stopped process, for its log."""
    proc = TwistdProcess(*args, env=env)
    try:
        proc.port()
        proc.wait_for_line(r"Redis subscriber connection .* is up")
    finally:
        code = proc.terminate()
    assert code == 0, proc.log()
    return proc


def rss_mb(pid: int) -> float:
    """Resident memory of process C{pid} in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")
