"""Nothing that runs writes into the working directory unasked: every Redis child works
in a private directory (a replica's full sync or a SAVE wrote a dump.rdb into the
checkout, which was then committed), and the benchmarks write results only to the
C{--json PATH} they are given."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from conftest import REPO
from daemonproc import TwistdProcess
from emojistream.demo import free_port


def redis_command(port: int, *args: bytes) -> list[bytes]:
    """Send one command and return the reply's lines (a short reply: read until it is
    complete, which is when it ends in CRLF and holds as many lines as it announces)."""
    request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        reply = b""
        while not _complete(reply):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n")[:-1]


def _complete(reply: bytes) -> bool:
    if not reply.endswith(b"\r\n"):
        return False
    if reply.startswith(b"*"):
        count = int(reply[1:reply.index(b"\r\n")])
        return reply.count(b"\r\n") >= 1 + 2 * count
    return True


def working_directory(port: int) -> str:
    """The Redis server's working directory (CONFIG GET dir)."""
    lines = redis_command(port, b"CONFIG", b"GET", b"dir")
    return lines[-1].decode()


def test_the_tests_redis_works_in_a_private_directory_removed_at_stop(redis_server):
    directory = redis_server.directory
    assert directory is not None and os.path.isdir(directory)
    assert working_directory(redis_server.port) == os.path.realpath(directory)
    assert redis_command(redis_server.port, b"SAVE") == [b"+OK"]
    assert os.path.isfile(os.path.join(directory, "dump.rdb"))
    redis_server.stop()
    assert not os.path.exists(directory)


@pytest.mark.slow
def test_the_demo_redis_works_in_a_private_directory_removed_at_stop():
    proc = TwistdProcess("emojistream", "--demo", "--listen",
                         f"tcp:{free_port()}:interface=127.0.0.1")
    try:
        ready = proc.wait_for_line(r"Embedded Redis is ready at redis://127\.0\.0\.1:(\d+)")
        port = int(ready.group(1))
        directory = working_directory(port)
        assert os.path.commonpath([directory, REPO.resolve()]) != str(REPO.resolve())
        assert os.path.basename(directory).startswith("emojistream-redis-")
        # What a SAVE (or a replica's sync) writes lands there, not in the checkout.
        assert redis_command(port, b"SAVE") == [b"+OK"]
        assert os.path.isfile(os.path.join(directory, "dump.rdb"))
    finally:
        code = proc.terminate()
    assert code == 0, proc.log()
    assert not os.path.exists(directory)


def test_the_benchmark_writes_results_only_where_it_is_told():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench import parse_args
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert parse_args([]).json is None
    assert parse_args(["--json", "/tmp/x.json"]).json == "/tmp/x.json"
