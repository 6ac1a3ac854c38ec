"""A real redis-server child process for a test: started on a free loopback port,
restartable on the same port, always stopped at the end."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from emojistream.demo import find_redis_server, free_port, redis_server_args

READY = b"Ready to accept connections"


class RedisProcess:
    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        #: A port of its own choosing may be chosen again if another process takes it
        #: between the choice and the bind (the first start only: a restart keeps it).
        self._may_move = port is None
        self.port = port or free_port()
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        #: The server's private working directory while it runs (its --dir).
        self.directory: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start redis-server and return once it accepts connections (in the directory
        it was stopped with, if kept: it loads what it saved there)."""
        for _ in range(3 if self._may_move else 1):
            try:
                self._start(timeout)
            except RuntimeError as e:
                if not (self._may_move and "Address already in use" in str(e)):
                    raise
                self.port = free_port()
            else:
                break
        else:
            self._start(timeout)
        self._may_move = False

    def _start(self, timeout: float) -> None:
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="emojistream-test-redis-")
        args = (redis_server_args(find_redis_server(), self.port, self.directory)
                + list(self.extra_args))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while READY not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {seen.decode(errors='replace')}")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk and self.proc.poll() is not None:
                    continue
                seen += chunk
        # Keep draining its output so the pipe never fills.
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [None for _ in iter(lambda: stdout.read(4096), b"")],
                         daemon=True).start()

    def stop(self, keep_directory: bool = False) -> None:
        """SIGTERM and wait for exit (no-op when not running); with C{keep_directory},
        the next L{start} runs in the same directory."""
        self._end(signal.SIGTERM, keep_directory)

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        self._end(signal.SIGKILL)

    def _end(self, sig: int, keep_directory: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.directory is not None and not keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
