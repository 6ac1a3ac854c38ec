"""Whole-process behaviour: connection churn leaves nothing behind, SIGTERM drains."""

from __future__ import annotations

import json
import signal
import time

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from daemonproc import TwistdProcess, rss_mb
from emojistream.demo import free_port
from sseclient import Client, raw_connect, response_events, within


def start(redis_server, *extra: str) -> tuple[TwistdProcess, int]:
    port = free_port()
    # The backlog the default endpoint has: with Twisted's 50, a batch of 500 connects
    # overflows it, and each overflow costs the client a 1-s SYN retransmission.
    proc = TwistdProcess("emojistream", "--listen",
                         f"tcp:{port}:interface=127.0.0.1:backlog=1024",
                         "--redis", redis_server.url, *extra)
    assert proc.port() == port
    proc.wait_for_line(r"Redis subscriber connection .* is up")
    return proc, port


PATHS = [b"/subscribe/eps", b"/subscribe/raw", b"/subscribe/details/2665",
         b"/subscribe/details"]


def open_stream(port: int, path: bytes) -> Deferred:
    return Deferred.fromCoroutine(_open_stream(port, path))


async def _open_stream(port: int, path: bytes):
    conn = await raw_connect(port)
    conn.transport.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    await conn.wait_bytes(lambda b: b"\r\n\r\n" in b)
    return conn


@pytest_twisted.ensureDeferred
async def test_20000_streams_opened_and_closed_leave_empty_pools_and_flat_memory(
        redis_server):
    proc, port = start(redis_server)
    client = Client(f"http://127.0.0.1:{port}")
    try:
        # Warm up, so that start-up allocations are not counted as growth.
        for conn in await gatherResults([open_stream(port, p) for p in PATHS * 50]):
            conn.close()
        await client.text("GET", "/admin/status.json")
        before = rss_mb(proc.proc.pid)
        batch = 500
        for n in range(20_000 // batch):
            conns = await within(gatherResults(
                [open_stream(port, PATHS[i % len(PATHS)]) for i in range(batch)]), 60)
            for i, conn in enumerate(conns):
                if (i + n) % 2:
                    conn.close()  # abort, as a vanished client
                else:
                    conn.transport.loseConnection()  # polite close
            await within(gatherResults([c.wait_closed() for c in conns]), 60)
        _, body = await client.text("GET", "/admin/status.json")
        after = rss_mb(proc.proc.pid)
    finally:
        await client.close()
        proc.terminate()
    print(f"churn RSS: {before:.1f} MB before, {after:.1f} MB after 20,000 streams")
    status = json.loads(body)
    assert status["connections"] == []
    assert status["pools"] == {"eps": 0, "raw": 0, "detail": 0, "kiosk": 0}
    assert status["totals"]["connections.closed"] == 20_000 + 200
    assert after - before < 20, (before, after)


@pytest.mark.parametrize("drain", [3.0])
@pytest_twisted.ensureDeferred
async def test_sigterm_drains_200_clients_with_retry_hints_and_exits_0(redis_server, drain):
    proc, port = start(redis_server, "--drain-sec", str(drain))
    try:
        conns = await within(gatherResults(
            [open_stream(port, PATHS[i % len(PATHS)]) for i in range(200)]), 60)
        sent = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        closed_at: list[float] = []
        for conn in conns:
            conn.closed.addCallback(lambda _: closed_at.append(time.monotonic() - sent))
        await within(gatherResults([c.wait_closed() for c in conns]), drain + 10)
        code = proc.proc.wait(30)
    finally:
        proc.terminate()
    print(f"drain: closes from {min(closed_at):.2f} s to {max(closed_at):.2f} s, exit {code}")
    assert code == 0, proc.log()
    assert max(closed_at) <= drain + 1, max(closed_at)
    # Spread over the period, not one wave.
    assert min(closed_at) < drain / 3 and max(closed_at) > drain / 2
    hints = []
    for conn in conns:
        parsed = response_events(conn.received)
        assert len(parsed.retries) == 1, conn.received[-200:]
        hints.append(parsed.retries[0])
        # The response was ended properly (last chunk) before the connection closed.
        assert conn.received.endswith(b"0\r\n\r\n")
    assert min(hints) >= 1000 and max(hints) <= 4000 and len(set(hints)) > 50
    assert "Traceback" not in proc.log()


def test_startup_objects_are_frozen_out_of_garbage_collections():
    import gc
    import weakref

    from emojistream.lifecycle import freeze_startup_objects

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    gc.unfreeze()
    garbage = weakref.ref(Cycle())  # start-up garbage: to be collected, not frozen
    alive = Cycle()
    tracked_before = len(gc.get_objects())
    try:
        freeze_startup_objects()
        assert garbage() is None
        assert gc.get_freeze_count() > 0
        # What is alive now is out of every collection's way.
        assert not any(o is alive for o in gc.get_objects())
        assert len(gc.get_objects()) < tracked_before / 10
    finally:
        gc.unfreeze()
