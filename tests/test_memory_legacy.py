"""Legacy connection management decided in code, driven in memory (tests/memory.py):
retry hints, the cleanup header, the close timer, the client address behind trusted
proxies, the kiosk stream's event names, disabled streams, the verbose connection log.
test_legacy.py keeps one real-Redis, real-HTTP test of each feature."""

from __future__ import annotations

import json

import pytest

from conftest import LogCapture
from memory import MemoryClient, MemoryDaemon
from sseclient import response_events


def retries(client: MemoryClient) -> list[int]:
    return response_events(bytes(client.received)).retries


def test_retry_hints_are_configurable() -> None:
    d = MemoryDaemon({"SSE_FORCE_REFRESH": "true", "SSE_SCORE_RETRY_MS": "2500",
                      "SSE_DETAIL_RETRY_MS": "7"})
    eps, raw, detail = d.connect(), d.connect(), d.connect()
    eps.get("/subscribe/eps")
    raw.get("/subscribe/raw")
    detail.get("/subscribe/details/2665")
    assert (retries(eps), retries(raw), retries(detail)) == ([2500], [2500], [7])


def test_the_retry_hint_is_the_first_chunk_of_a_forced_refresh_stream() -> None:
    d = MemoryDaemon({"SSE_FORCE_REFRESH": "true"})
    for path, retry in (("/subscribe/eps", b"100"), ("/subscribe/raw", b"100"),
                        ("/subscribe/details/2665", b"500")):
        client = d.connect()
        client.get(path)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert client.head[1]["x-sse-cleanup-requested"] == "true"
        payload = b"retry:" + retry + b"\n\n"
        assert body == b"%x\r\n" % len(payload) + payload + b"\r\n", body


def test_without_forced_refresh_there_is_no_retry_nor_cleanup_header() -> None:
    d = MemoryDaemon()
    for path in ("/subscribe/eps", "/subscribe/raw", "/subscribe/details/2665"):
        client = d.connect()
        client.get(path)
        assert client.head[0] == "HTTP/1.1 200 OK"
        assert "x-sse-cleanup-requested" not in client.head[1]
        assert retries(client) == []


def test_the_close_timer_is_cancelled_when_the_client_leaves_first() -> None:
    d = MemoryDaemon({"SSE_FORCE_REFRESH": "true"})
    timers_before = len(d.reactor.getDelayedCalls())
    client = d.connect()
    client.get("/subscribe/details/2665")
    (stream,) = d.app.hub.in_namespace("/details/2665")
    assert len(d.reactor.getDelayedCalls()) == timers_before + 1
    finished: list[object] = []
    stream.writer.when_finished().addCallback(finished.append)
    client.close()
    assert finished and len(d.app.hub) == 0
    assert len(d.reactor.getDelayedCalls()) == timers_before
    d.advance(1000)  # nothing left to fire at a gone client


#: (environment, request header lines, the address recorded for the stream)
ADDRESSES = [
    ({}, ["X-Forwarded-For: 203.0.113.7"], "203.0.113.7"),
    ({}, ["X-Forwarded-For: 6.6.6.6, 203.0.113.7"], "203.0.113.7"),
    ({}, ["X-Forwarded-For: 6.6.6.6", "X-Forwarded-For: 203.0.113.7"], "203.0.113.7"),
    ({}, ["X-Real-IP: 6.6.6.6"], "127.0.0.1"),
    ({}, ["X-Forwarded-For: not an address"], "127.0.0.1"),
    ({"PROXY_HOPS": "2"}, ["X-Forwarded-For: 6.6.6.6, 203.0.113.7, 10.0.0.2"],
     "203.0.113.7"),
    ({"PROXY_HOPS": "2"}, ["X-Forwarded-For: 10.0.0.2"], "127.0.0.1"),
    # A router that sets X-Real-IP and passes the client's X-Forwarded-For on.
    ({"CLIENT_IP_HEADER": "X-Real-IP"},
     ["X-Forwarded-For: 6.6.6.6", "X-Real-IP: 203.0.113.7"], "203.0.113.7"),
    ({"CLIENT_IP_HEADER": "X-Real-IP"}, ["X-Forwarded-For: 6.6.6.6"], "127.0.0.1"),
]


@pytest.mark.parametrize(("env", "headers", "expected"), ADDRESSES)
def test_the_client_address_is_the_one_the_trusted_proxies_appended(
        env: dict[str, str], headers: list[str], expected: str) -> None:
    d = MemoryDaemon({"TRUST_PROXY": "1", **env})
    client = d.connect("127.0.0.1")
    client.get("/subscribe/eps", headers="".join(f"{h}\r\n" for h in headers))
    assert client.head[0] == "HTTP/1.1 200 OK"
    (stream,) = d.app.hub.in_namespace("/eps")
    assert stream.client_ip == expected


def cleanup(d: MemoryDaemon, path: str, headers: str = "") -> tuple[str, bytes]:
    caller = d.connect("127.0.0.1")
    caller.get(path, method="POST", headers=headers)
    return caller.head[0], caller.body


def test_proxy_headers_are_ignored_unless_trusted() -> None:
    d = MemoryDaemon()
    d.connect("127.0.0.1").get("/subscribe/eps",
                               headers="X-Forwarded-For: 203.0.113.7\r\n")
    (stream,) = d.app.hub.in_namespace("/eps")
    assert stream.client_ip == "127.0.0.1"
    # The spoofed header does not matter: the caller is 127.0.0.1, whose stream it is.
    _, body = cleanup(d, "/subscribe/cleanup/scores", "X-Forwarded-For: 203.0.113.7\r\n")
    assert json.loads(body) == {"status": "OK", "closed": 1}


def test_a_cleanup_caller_cannot_pose_as_another_behind_a_trusted_proxy() -> None:
    d = MemoryDaemon({"TRUST_PROXY": "yes"})
    a_ip, b_ip = "203.0.113.7", "198.51.100.9"
    for ip, path in ((a_ip, "/subscribe/eps"), (a_ip, "/subscribe/raw"),
                     (a_ip, "/subscribe/details/X"), (a_ip, "/subscribe/details/Y"),
                     (b_ip, "/subscribe/eps"), (b_ip, "/subscribe/details/X")):
        # What the client wrote comes first; the proxy appends the address it saw.
        d.connect().get(path, headers=f"X-Forwarded-For: 10.9.9.9, {ip}\r\n")
    status, body = cleanup(d, "/subscribe/cleanup/scores", f"X-Forwarded-For: {a_ip}\r\n")
    assert status == "HTTP/1.1 200 OK" and body == b'{"status":"OK","closed":2}'
    _, body = cleanup(d, "/subscribe/cleanup/details/X", f"X-Forwarded-For: {a_ip}\r\n")
    assert json.loads(body) == {"status": "OK", "closed": 1}
    assert sorted((s.client_ip, s.namespace) for s in d.app.hub.streams()) == [
        (b_ip, "/details/X"), (b_ip, "/eps"), (a_ip, "/details/Y")]
    # What a client writes before the proxy's entry, or an X-Real-IP the proxy does
    # not set, is not believed.
    for header in (f"X-Forwarded-For: {b_ip}, 192.0.2.66", f"X-Real-IP: {b_ip}"):
        _, body = cleanup(d, "/subscribe/cleanup/scores", header + "\r\n")
        assert json.loads(body) == {"status": "OK", "closed": 0}, header
    _, body = cleanup(d, "/subscribe/cleanup/scores", f"X-Forwarded-For: {b_ip}\r\n")
    assert json.loads(body) == {"status": "OK", "closed": 1}
    _, body = cleanup(d, "/subscribe/cleanup/scores", f"X-Forwarded-For: {b_ip}\r\n")
    assert json.loads(body) == {"status": "OK", "closed": 0}
    status, _ = cleanup(d, "/subscribe/cleanup/details/a.b", f"X-Forwarded-For: {b_ip}\r\n")
    assert status.startswith("HTTP/1.1 400 ")


def test_kiosk_events_are_named_by_their_channel_repaired_as_utf8() -> None:
    d = MemoryDaemon({"ENABLE_KIOSK_INTERACTION_STREAM": "1"})
    kiosk = d.connect()
    kiosk.get("/subscribe/kiosk_interaction")
    d.publish(b"stream.interaction.foo", b'{"x":1}')
    d.publish(b"stream.interaction.bar.baz", b"two\nlines")
    # A channel name that is not UTF-8 is repaired like a payload.
    d.publish(b"stream.interaction.caf\xc3\xa9\xff", b"named oddly")
    assert [(e.type, e.data) for e in kiosk.events()] == [
        ("stream.interaction.foo", '{"x":1}'), ("stream.interaction.bar.baz", "two\nlines"),
        ("stream.interaction.caf\u00e9\ufffd", "named oddly")]
    assert kiosk.body.startswith(b'event:stream.interaction.foo\ndata:{"x":1}\n\n')
    # What went out is valid UTF-8, as the Content-Type promises.
    kiosk.body.decode("utf-8")


def test_disabled_streams_are_404() -> None:
    d = MemoryDaemon({"ENABLE_RAW_STREAM": "false"})
    for path in ("/subscribe/kiosk_interaction", "/subscribe/raw"):
        client = d.connect()
        client.get(path)
        assert client.head[0] == "HTTP/1.1 404 Not Found", path
    assert len(d.app.hub) == 0


def test_verbose_logs_connect_and_disconnect_with_path_ip_and_age(logs: LogCapture) -> None:
    d = MemoryDaemon({"VERBOSE": "1"})
    client = d.connect("127.0.0.1")
    client.get("/subscribe/details/2665")
    d.advance(42)
    client.close()
    assert len(d.app.hub) == 0
    mine = [e for e in logs.events if e.get("log_namespace") == "emojistream.web.StreamRoutes"]
    connect = [e for e in mine if e["log_format"].startswith("connect")]
    disconnect = [e for e in mine if e.get("what") == "disconnect"]
    assert len(connect) == 1 and connect[0]["path"] == "/subscribe/details/2665"
    assert connect[0]["ip"] == "127.0.0.1"
    assert len(disconnect) == 1 and disconnect[0]["age"] == 42


def test_without_verbose_nothing_is_logged_per_connection(logs: LogCapture) -> None:
    d = MemoryDaemon()
    client = d.connect("127.0.0.1")
    client.get("/subscribe/details/2665")
    client.close()
    assert not [e for e in logs.events
                if e.get("log_namespace") == "emojistream.web.StreamRoutes"]
