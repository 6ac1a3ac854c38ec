"""Hostile clients on the open internet: request heads trickled forever, floods of
connections from one address, and the open-file limit."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import re
import selectors
import socket
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from conftest import running
from daemonproc import TwistdProcess
from emojistream.demo import free_port
from manyclients import allow_files
from sseclient import raw_connect


@pytest_twisted.ensureDeferred
async def test_a_trickled_request_head_gets_408_but_an_answered_stream_is_never_timed(
        redis_server, publisher):
    env = {"REDIS_URL": redis_server.url, "REQUEST_TIMEOUT_SEC": "3"}
    async with running(env) as (d, c):
        _, stream = await c.stream("/subscribe/details/2665")
        slow = await raw_connect(d.port)
        started = reactor.seconds()
        closed_at: list[float] = []
        slow.closed.addCallback(lambda _: closed_at.append(reactor.seconds()))
        slow.transport.write(b"GET /subscribe/eps HTTP/1.1\r\n")
        # One header line every 2 s: each byte used to restart Twisted's idle timeout.
        for n in range(3):
            if slow.is_closed:
                break
            await deferLater(reactor, 2, lambda: None)
            if not slow.is_closed:
                slow.transport.write(b"X-Trickle-%d: 1\r\n" % n)
        await slow.wait_closed(seconds=10)
        took = closed_at[0] - started
        assert slow.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), slow.received
        assert took < 3 + 1, took
        # The stream, answered long before, is still open after its 6 s: not timed.
        await publisher.publish("stream.tweet_updates.2665", "still here")
        await stream.wait_events(1)
        assert not stream.is_closed
        assert len(d.app.hub) == 1


def _hold_connections(port: int, n: int, ready: object, done: object) -> None:
    """A flooding process: opens C{n} idle connections and holds them until told."""
    allow_files(n + 64)
    held = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    ready.set()  # type: ignore[attr-defined]
    done.wait(120)  # type: ignore[attr-defined]
    for sock in held:
        sock.close()


def _closed_by_server(socks: list[socket.socket], expected: int, seconds: float = 30
                      ) -> list[socket.socket]:
    """The sockets the server closed: wait for C{expected} of them, then half a second
    more for any beyond."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    closed: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        events = selector.select(0.5 if len(closed) >= expected else 1)
        if not events and len(closed) >= expected:
            break
        for key, _ in events:
            try:
                data = key.fileobj.recv(1)  # type: ignore[union-attr]
            except ConnectionResetError:
                data = b""
            if not data:
                closed.append(key.fileobj)  # type: ignore[arg-type]
                selector.unregister(key.fileobj)
    selector.close()
    return closed


def _status(port: int) -> dict:
    with socket.create_connection(("127.0.0.3", port), timeout=10,
                                  source_address=("127.0.0.4", 0)) as conn:
        conn.sendall(b"GET /admin/status.json HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


def test_connections_per_address_are_capped_and_a_flood_locks_nobody_else_out(
        redis_server):
    port = free_port()
    proc = TwistdProcess("emojistream", "--listen",
                         f"tcp:{port}:interface=0.0.0.0:backlog=4096", "--redis",
                         redis_server.url, "--max-connections-per-ip", "100",
                         "--admin-listen", "tcp:0:interface=127.0.0.3")
    try:
        proc.wait_for_line(r"Redis subscriber connection .* is up")
        allow_files(2100)
        # 2,000 connections from 127.0.0.1 that send nothing: 100 stay, the rest are
        # closed at once.
        held = [socket.create_connection(("127.0.0.1", port), timeout=10)
                for _ in range(2000)]
        closed = _closed_by_server(held, expected=1900)
        assert len(closed) == 1900
        # None of them cost a stream, and the refusals are counted.
        admin = int(re.search(r"Serving HTTP on 127\.0\.0\.3:(\d+)", proc.log()).group(1))
        status = _status(admin)
        assert sum(status["pools"].values()) == 0
        assert status["totals"]["connections.refused_per_ip"] == 1900
        for sock in held:
            sock.close()
        # A flood past the open-file limit (20,000 here): 21,000 idle connections from
        # one address, from two processes.
        ctx = mp.get_context("fork")
        ready = [ctx.Event(), ctx.Event()]
        done = ctx.Event()
        floods = [ctx.Process(target=_hold_connections, args=(port, 10_500, r, done))
                  for r in ready]
        for f in floods:
            f.start()
        try:
            for r in ready:
                assert r.wait(120)
            # Another address is served at once, data flowing.
            client = socket.create_connection(("127.0.0.1", port), timeout=5,
                                              source_address=("127.0.0.2", 0))
            started = time.monotonic()
            client.sendall(b"GET /subscribe/raw HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(4096)
            assert time.monotonic() - started < 0.1
            assert head.startswith(b"HTTP/1.1 200 ")
            with socket.create_connection(("127.0.0.1", redis_server.port)) as redis:
                redis.sendall(b"PUBLISH stream.score_updates 2665\r\n")
                redis.recv(100)
            data = b""
            while b"data:2665" not in data:
                data += client.recv(4096)
            client.close()
        finally:
            done.set()
            for f in floods:
                f.join(60)
    finally:
        assert proc.terminate() == 0
    assert "Traceback" not in proc.log() and "EMFILE" not in proc.log()


def accept_queue(port: int) -> int:
    """Connections waiting in the kernel's accept queue of the loopback listener on
    C{port} (the receive-queue column of a listening socket in /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                return int(queues.split(":")[1], 16)
    raise LookupError(f"nothing listens on port {port}")


def test_at_the_open_file_limit_accepting_pauses_and_resumes(redis_server):
    port = free_port()
    proc = TwistdProcess("emojistream", "--listen",
                         f"tcp:{port}:interface=127.0.0.1:backlog=1024",
                         "--redis", redis_server.url, open_files=300)
    conns: list[socket.socket] = []
    try:
        proc.wait_for_line(r"Redis subscriber connection .* is up")
        for _ in range(400):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /subscribe/details/2665 HTTP/1.1\r\nHost: x\r\n\r\n")
            conns.append(sock)
        proc.wait_for_line(r"Open-file limit: \d+ connections open")
        # The first streams (the default --max-streams fits 300 files: 225) flow.
        with socket.create_connection(("127.0.0.1", redis_server.port)) as redis:
            redis.sendall(b"PUBLISH stream.tweet_updates.2665 flowing\r\n")
            redis.recv(100)
        for sock in conns[:200]:
            sock.settimeout(10)
            data = b""
            while b"data:flowing" not in data:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
        # The extra connections close; accepting resumes and a new client is served.
        for sock in conns[225:]:
            sock.close()
        del conns[225:]
        proc.wait_for_line(r"Accepting connections again")
        # That line may be from an earlier pause (a second one in the same minute is not
        # logged), and the closed connections still queued would be accepted ahead of
        # the new client, up to the limit again: wait until the daemon has taken them.
        deadline = time.monotonic() + 10
        while accept_queue(port) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert accept_queue(port) == 0
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        conns.append(client)
        client.sendall(b"GET /admin/status.json HTTP/1.1\r\nHost: x\r\n"
                       b"Connection: close\r\n\r\n")
        client.settimeout(10)
        assert client.recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in conns:
            sock.close()
        assert proc.terminate() == 0
    limit_lines = [line for line in proc.lines if "Open-file limit" in line]
    assert len(limit_lines) == 1, limit_lines
    assert "Traceback" not in proc.log() and "EMFILE" not in proc.log()
