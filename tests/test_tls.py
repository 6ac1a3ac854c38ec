"""TLS: an ssl: endpoint with every option (a certificate made by openssl here)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

from conftest import running
from emojistream.http import tcp_socket
from sseclient import RawConnection, response_events, within

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(not OPENSSL, reason="needs openssl")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A server key and certificate (for localhost and 127.0.0.1) signed by a test CA
    made here; the CA certificate is C{ca.pem} beside them."""
    return make_certificate(tmp_path)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    def openssl(*args: str) -> None:
        subprocess.run([OPENSSL or "openssl", *args], check=True, capture_output=True,
                       cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
            "-out", "ca.pem", "-days", "2", "-subj", "/CN=emojistream test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
            "server.csr", "-subj", "/CN=localhost")
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "san.ext")
    return directory / "key.pem", directory / "cert.pem"


@pytest_twisted.ensureDeferred
async def test_a_tls_stream_with_a_small_send_buffer(certificate, redis_server, publisher):
    key, cert = certificate
    env = {"REDIS_URL": redis_server.url, "SSE_SEND_BUFFER_BYTES": "4096"}
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    async with running(env, {"listen": listen}) as (d, _c):
        trust = ssl.Certificate.loadPEM((cert.parent / "ca.pem").read_bytes())
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust)
        conn = RawConnection()
        await within(connectProtocol(
            SSL4ClientEndpoint(reactor, "127.0.0.1", d.port, options), conn))
        conn.transport.write(b"GET /subscribe/details/2665 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await conn.wait_bytes(lambda data: b"\r\n\r\n" in data)
        assert conn.received.startswith(b"HTTP/1.1 200 ")
        (stream,) = d.app.hub.in_namespace("/details/2665")
        handle = tcp_socket(stream.writer.request.channel.transport)
        assert handle is not None
        # Linux doubles what it is asked for, for bookkeeping.
        assert handle.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 4096
        await publisher.publish("stream.tweet_updates.2665", "over TLS")
        await conn.wait_bytes(lambda data: b"data:over TLS" in data)
        assert [e.data for e in response_events(conn.received).events] == ["over TLS"]
        conn.close()
