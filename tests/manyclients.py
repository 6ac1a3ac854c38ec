"""Thousands of SSE clients on plain sockets, read with one selector (no reactor):
for tests that put a real load on daemons in other processes."""

from __future__ import annotations

import resource
import selectors
import socket
import time
from collections.abc import Callable

from sseclient import dechunk
from ssespec import Event, SpecParser


def allow_files(n: int) -> None:
    """Raise this process's soft open-file limit to hold C{n} more sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, soft + n) if hard != resource.RLIM_INFINITY else soft + n
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class RawStream:
    """One client: the bytes it received, whether the server closed it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.raw = bytearray()
        self.closed = False

    def events(self) -> list[Event]:
        _, _, body = bytes(self.raw).partition(b"\r\n\r\n")
        parser = SpecParser()
        parser.feed(dechunk(body))
        return parser.events


class ManyStreams:
    """C{n} streams of C{path} on C{port}, opened one after the other."""

    def __init__(self, port: int, path: str, n: int, host: str = "127.0.0.1") -> None:
        allow_files(n + 64)
        self.selector = selectors.DefaultSelector()
        self.streams: list[RawStream] = []
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for _ in range(n):
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(request)
            sock.setblocking(False)
            stream = RawStream(sock)
            self.streams.append(stream)
            self.selector.register(sock, selectors.EVENT_READ, stream)

    def pump(self, until: Callable[[], bool], timeout: float = 30) -> None:
        """Read whatever arrives until C{until()} holds; fail after C{timeout} s."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting for the streams"
            for key, _ in self.selector.select(min(left, 0.5)):
                stream: RawStream = key.data
                try:
                    data = stream.sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    stream.closed = True
                    self.selector.unregister(stream.sock)
                else:
                    stream.raw += data

    def all_started(self) -> bool:
        return all(b"\r\n\r\n" in s.raw for s in self.streams)

    def close(self) -> None:
        for stream in self.streams:
            stream.sock.close()
        self.selector.close()
