"""Every core on one port: two daemons sharing a reuseport: port, and --workers 2.
2,000 real clients, a real Redis, kill -9 of one worker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemonproc import TwistdProcess
from emojistream.demo import free_port
from manyclients import ManyStreams

CLIENTS = 2000


def publish(redis_port: int, channel: str, payloads: list[str]) -> None:
    with socket.create_connection(("127.0.0.1", redis_port)) as redis:
        for payload in payloads:
            redis.sendall(f"PUBLISH {channel} {payload}\r\n".encode())
            redis.recv(100)


def status_of_each(port: int, nodes: int) -> dict[str, dict]:
    """status.json of every worker behind the shared port: each new connection lands on
    one of them as the kernel's hash of its address decides."""
    found: dict[str, dict] = {}
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /admin/status.json?limit=0 HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        document = json.loads(data.partition(b"\r\n\r\n")[2])
        found[document["node"]] = document
        if len(found) == nodes:
            return found
    raise AssertionError(f"reached only {sorted(found)}")


def count_lines(proc: TwistdProcess, pattern: str) -> int:
    return sum(bool(re.search(pattern, line)) for line in proc.lines)


def check_spread_delivery_and_kill(port: int, redis_port: int, pids: dict[str, int]
                                   ) -> tuple[str, float, ManyStreams]:
    """Open the clients, check the spread and delivery, kill -9 one worker, check the
    other's clients. Returns the killed worker's node, when it was killed, and the
    clients."""
    clients = ManyStreams(port, "/subscribe/details/T", CLIENTS)
    try:
        clients.pump(clients.all_started, timeout=60)
        nodes = status_of_each(port, len(pids))
        held = {node: doc["pools"]["detail"] for node, doc in nodes.items()}
        assert sum(held.values()) == CLIENTS, held
        assert min(held.values()) >= 0.35 * CLIENTS, held
        first = [f"seq-{i}" for i in range(20)]
        publish(redis_port, "stream.tweet_updates.T", first)
        clients.pump(lambda: all(len(s.events()) >= 20 for s in clients.streams), 60)
        for stream in clients.streams:
            assert [e.data for e in stream.events()] == first
        victim = max(held, key=lambda node: held[node])
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        clients.pump(lambda: sum(s.closed for s in clients.streams) >= held[victim], 30)
        survivors = [s for s in clients.streams if not s.closed]
        assert len(survivors) == CLIENTS - held[victim]
        second = [f"after-{i}" for i in range(5)]
        publish(redis_port, "stream.tweet_updates.T", second)
        clients.pump(lambda: all(len(s.events()) >= 25 for s in survivors), 60)
        for stream in survivors:
            assert [e.data for e in stream.events()] == first + second
        return victim, killed_at, clients
    except BaseException:
        clients.close()
        raise


@pytest.fixture
def shared_port() -> int:
    return free_port()


def test_two_daemons_share_a_reuseport_port(redis_server, shared_port):
    procs = [TwistdProcess("emojistream", "--listen",
                           f"reuseport:{shared_port}:interface=127.0.0.1",
                           "--redis", redis_server.url, "--node", f"w{i}")
             for i in (1, 2)]
    try:
        for proc in procs:
            proc.port()
            proc.wait_for_line(r"Redis subscriber connection .* is up")
        pids = {f"twisted-development-w{i}": p.proc.pid for i, p in zip((1, 2), procs,
                                                                       strict=True)}
        _victim, _killed_at, clients = check_spread_delivery_and_kill(
            shared_port, redis_server.port, pids)
        clients.close()
    finally:
        for proc in procs:
            proc.terminate()


@pytest.fixture
def workers(redis_server, shared_port) -> Iterator[TwistdProcess]:
    proc = TwistdProcess("emojistream", "--workers", "2", "--listen",
                         f"tcp:{shared_port}:interface=127.0.0.1", "--redis",
                         redis_server.url, "--node", "multi", "--drain-sec", "1")
    try:
        proc.wait_for_lines(r"Redis subscriber connection .* is up", 2)
        yield proc
    finally:
        code = proc.terminate()
        assert code == 0, proc.log()


def test_workers_2_spread_deliver_and_replace_a_killed_worker(workers, redis_server,
                                                              shared_port):
    pids = {}
    for pid in workers.children():
        cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        pids[f"twisted-development-{cmdline[cmdline.index('--node') + 1]}"] = pid
    assert sorted(pids) == ["twisted-development-multi-1", "twisted-development-multi-2"]
    serving = count_lines(workers, r"Serving HTTP on")
    victim, killed_at, clients = check_spread_delivery_and_kill(shared_port,
                                                                redis_server.port, pids)
    try:
        # The parent starts a replacement, which is serving within 5 s of the kill.
        workers.wait_for_lines(r"Serving HTTP on", serving + 1, timeout=15)
        assert time.monotonic() - killed_at < 5
        nodes = status_of_each(shared_port, 2)
        assert victim in nodes and nodes[victim]["pools"]["detail"] == 0
    finally:
        clients.close()

