"""Behind real nginx (Debian's), with the documented config and with nginx's defaults,
in front of two nodes sharing one Redis."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from conftest import start_daemon
from emojistream.demo import free_port
from sseclient import RawConnection, response_events, split_response, within

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                  else None)
pytestmark = pytest.mark.skipif(not NGINX, reason="needs Debian's nginx")
SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "emojistream.conf"

DEFAULTS = """
upstream emojistream { server 127.0.0.1:8001; server 127.0.0.1:8002; }
server { listen 80; location / { proxy_pass http://emojistream; } }
"""


def site_config(text: str, port: int, nodes: list[int]) -> str:
    """The config as shipped, on the test's ports."""
    text = re.sub(r"listen 80;", f"listen 127.0.0.1:{port};", text)
    servers = iter(nodes)
    return re.sub(r"server 127\.0\.0\.1:800\d;", lambda m: f"server 127.0.0.1:{next(servers)};",
                  text)


class Nginx:
    def __init__(self, tmp: Path, site: str) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.site = site
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, nodes: list[int]) -> None:
        (self.tmp / "site.conf").write_text(site_config(self.site, self.port, nodes))
        user = "user root;" if os.geteuid() == 0 else ""
        (self.tmp / "nginx.conf").write_text(f"""{user}
worker_processes 1;
pid {self.tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {self.tmp}/body;
    proxy_temp_path {self.tmp}/proxy;
    fastcgi_temp_path {self.tmp}/fastcgi;
    uwsgi_temp_path {self.tmp}/uwsgi;
    scgi_temp_path {self.tmp}/scgi;
    include {self.tmp}/site.conf;
}}
""")
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.tmp), "-c", str(self.tmp / "nginx.conf"),
             "-g", "daemon off;"], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:  # nginx says nothing when it listens: try its port
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(params=["documented", "defaults"])
def nginx(request, tmp_path: Path) -> Iterator[Nginx]:
    site = SHIPPED.read_text() if request.param == "documented" else DEFAULTS
    proxy = Nginx(tmp_path, site)
    proxy.kind = request.param  # type: ignore[attr-defined]
    try:
        yield proxy
    finally:
        proxy.stop()


async def open_stream(port: int, path: str, headers: str = "") -> tuple[RawConnection, float]:
    """A stream through nginx from 127.0.0.2 (so nginx sees another address than its
    own); returns it and the seconds its response head took."""
    conn = RawConnection()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=("127.0.0.2", 0))
    started = reactor.seconds()
    await within(connectProtocol(endpoint, conn))
    conn.transport.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    await conn.wait_bytes(lambda data: b"\r\n\r\n" in data, seconds=10)
    return conn, reactor.seconds() - started


@pytest_twisted.ensureDeferred
async def test_streams_through_nginx_open_at_once_and_updates_pass_unbuffered(
        nginx, redis_server, publisher):
    env = {"REDIS_URL": redis_server.url, "TRUST_PROXY": "1"}
    nodes = [await start_daemon({**env, "NODE_NAME": f"n{i}"}) for i in (1, 2)]
    conns: list[RawConnection] = []
    try:
        await gatherResults([within(n.app.feed.when_subscribed()) for n in nodes])
        nginx.start([n.port for n in nodes])
        heads = []
        for _ in range(4):  # round robin: two on each node
            conn, took = await open_stream(nginx.port, "/subscribe/details/2665",
                                           "X-Forwarded-For: 203.0.113.7\r\n")
            conns.append(conn)
            heads.append(took)
        assert max(heads) < 0.5, heads
        assert [len(n.app.hub) for n in nodes] == [2, 2]
        status, headers, _ = split_response(conns[0].received)
        assert status.endswith(" 200 OK")
        assert dict(headers)["Content-Type"] == "text/event-stream; charset=utf-8"
        delays = []
        for i in range(10):
            sent = reactor.seconds()
            await publisher.publish("stream.tweet_updates.2665", f"update {i}")
            for conn in conns:
                await conn.wait_bytes(lambda data, i=i: f"data:update {i}\n".encode() in data,
                                      seconds=5)
            delays.append(reactor.seconds() - sent)
        assert max(delays) < 0.1, delays
        for conn in conns:
            events = response_events(conn.received).events
            assert [e.data for e in events] == [f"update {i}" for i in range(10)]
        if nginx.kind == "documented":
            # The address nginx saw, not the one the client wrote.
            ips = {s.client_ip for n in nodes for s in n.app.hub.streams()}
            assert ips == {"127.0.0.2"}
    finally:
        for conn in conns:
            conn.close()
        for node in nodes:
            await node.stop()



@pytest_twisted.ensureDeferred
async def test_behind_the_shipped_config_a_client_cannot_choose_its_x_real_ip(
        tmp_path: Path, redis_server):
    """CLIENT_IP_HEADER=X-Real-IP behind the shipped config: nginx sets the header to
    the address it saw, whatever the client wrote in it."""
    node = await start_daemon({"REDIS_URL": redis_server.url, "TRUST_PROXY": "1",
                               "CLIENT_IP_HEADER": "X-Real-IP"})
    proxy = Nginx(tmp_path, SHIPPED.read_text())
    conn = None
    try:
        await within(node.app.feed.when_subscribed())
        proxy.start([node.port, node.port])
        conn, _ = await open_stream(proxy.port, "/subscribe/raw",
                                    "X-Real-IP: 203.0.113.9\r\n"
                                    "X-Forwarded-For: 203.0.113.10\r\n")
        status, _, _ = split_response(conn.received)
        assert status.endswith(" 200 OK")
        assert [s.client_ip for s in node.app.hub.streams()] == ["127.0.0.2"]
    finally:
        if conn is not None:
            conn.close()
        proxy.stop()
        await node.stop()
