"""TLS: an ssl: endpoint with every option (a certificate made by openssl here); its
cipher suites, ALPN where write+execute memory is denied (the shipped units'
MemoryDenyWriteExecute=yes), and the request-head deadline over TLS."""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from conftest import REPO, running
from daemonproc import TwistdProcess
from emojistream.config import ConfigError, resolve
from emojistream.http import tcp_socket
from emojistream.tls import INTERMEDIATE_CIPHERS, h2_suitable, select_protocol, split_protocols
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


def listen_tls(key: Path, cert: Path) -> str:
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


# --- Cipher suites: Mozilla's intermediate list, HTTP/2 only over AEAD + forward secrecy


def s_client(port: int, *args: str) -> Deferred[str]:
    """openssl s_client's report of one handshake (in a thread: the daemon under test
    runs on this reactor)."""
    def run() -> str:
        done = subprocess.run(
            [OPENSSL or "openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            input=b"", capture_output=True, timeout=30)
        return (done.stdout + done.stderr).decode("utf-8", "replace")
    return threads.deferToThread(run)


def negotiated(report: str) -> tuple[str, str]:
    """The suite and the ALPN protocol s_client reports ("(NONE)"/"" when none)."""
    cipher = re.search(r"Cipher is (\S+)", report)
    alpn = re.search(r"ALPN protocol: (\S+)", report)
    return (cipher.group(1) if cipher else "(NONE)"), (alpn.group(1) if alpn else "")


@pytest_twisted.ensureDeferred
async def test_tls12_takes_only_forward_secret_aead_suites_and_h2_runs_over_them(
        certificate, redis_server):
    key, cert = certificate
    async with running({"REDIS_URL": redis_server.url},
                       {"listen": listen_tls(key, cert)}) as (d, _c):
        for legacy in ("AES128-SHA", "AES256-SHA256", "ECDHE-RSA-AES128-SHA",
                       "ECDHE-RSA-AES256-SHA384"):
            report = await s_client(d.port, "-tls1_2", "-cipher", legacy)
            assert negotiated(report)[0] == "(NONE)", negotiated(report)
            assert "handshake failure" in report, negotiated(report)
        for modern in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
                       "ECDHE-RSA-CHACHA20-POLY1305"):
            report = await s_client(d.port, "-tls1_2", "-cipher", modern,
                                    "-alpn", "h2,http/1.1")
            assert negotiated(report) == (modern, "h2"), negotiated(report)
        # TLS 1.3 as OpenSSL has it; below TLS 1.2 nothing.
        report = await s_client(d.port, "-tls1_3", "-alpn", "h2,http/1.1")
        assert negotiated(report)[0].startswith("TLS_") and negotiated(report)[1] == "h2"
        report = await s_client(d.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        assert negotiated(report)[0] == "(NONE)", negotiated(report)


@pytest_twisted.ensureDeferred
async def test_an_operators_cipher_list_is_used_and_h2_keeps_off_its_unfit_suites(
        certificate, redis_server):
    key, cert = certificate
    env = {"REDIS_URL": redis_server.url,
           "TLS_CIPHERS": "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-SHA"}
    async with running(env, {"listen": listen_tls(key, cert)}) as (d, _c):
        # Not on the list: refused.
        report = await s_client(d.port, "-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384")
        assert negotiated(report)[0] == "(NONE)", negotiated(report)
        # On it, but no AEAD: served, over HTTP/1.1 only (RFC 9113 9.2.2).
        report = await s_client(d.port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA",
                                "-alpn", "h2,http/1.1")
        assert negotiated(report) == ("ECDHE-RSA-AES128-SHA", "http/1.1"), negotiated(report)
        # TLS 1.3's suites are all fit for HTTP/2.
        report = await s_client(d.port, "-tls1_3", "-alpn", "h2,http/1.1")
        assert negotiated(report)[1] == "h2", negotiated(report)


def test_the_cipher_setting_is_checked_and_defaults_to_the_intermediate_list():
    assert resolve({}, {"listen": "tcp:0"}).tls_ciphers == INTERMEDIATE_CIPHERS
    given = resolve({"TLS_CIPHERS": "ECDHE+AESGCM"}, {"listen": "tcp:0"})
    assert given.tls_ciphers == "ECDHE+AESGCM"
    option = resolve({"TLS_CIPHERS": "ECDHE+AESGCM"},
                     {"listen": "tcp:0", "tls_ciphers": "ECDHE+CHACHA20"})
    assert option.tls_ciphers == "ECDHE+CHACHA20"
    for bad in ("NO-SUCH-CIPHER", "AES128-SHA\nX-Injected: 1"):
        with pytest.raises(ConfigError, match=r"^TLS_CIPHERS: .*cipher") as caught:
            resolve({"TLS_CIPHERS": bad}, {"listen": "tcp:0"})
        assert "\n" not in str(caught.value)


def test_h2_is_chosen_only_where_the_suite_is_fit_for_it():
    assert split_protocols(b"\x02h2\x08http/1.1") == [b"h2", b"http/1.1"]
    ours = [b"h2", b"http/1.1"]
    assert select_protocol([b"http/1.1", b"h2"], ours, h2_ok=True) == b"h2"
    assert select_protocol([b"h2", b"http/1.1"], ours, h2_ok=False) == b"http/1.1"
    assert select_protocol([b"h2"], ours, h2_ok=False) is None
    assert select_protocol([b"spdy/3"], ours, h2_ok=True) is None
    for fit in ("TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256",
                "ECDHE-ECDSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305"):
        assert h2_suitable(fit), fit
    for unfit in ("AES128-SHA", "AES256-SHA256", "AES128-GCM-SHA256",
                  "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384", "DHE-RSA-AES128-SHA"):
        assert not h2_suitable(unfit), unfit
    for suite in INTERMEDIATE_CIPHERS.split(":"):
        assert h2_suitable(suite), suite


# --- ALPN where write+execute memory is denied (systemd's MemoryDenyWriteExecute=yes)

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
UNITS = [REPO / "deploy" / "systemd" / name
         for name in ("emojistream.service", "emojistream@.service")]


def deny_write_execute() -> Any:
    """A preexec_fn that does in the child what MemoryDenyWriteExecute=yes does before
    exec (the kernel's PR_SET_MDWE, kept across exec). Made here, so that the child
    only calls it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def restrict() -> None:
        if prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")
    return restrict


def under_restriction(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, preexec_fn=deny_write_execute())


def curl(port: int, ca: Path, *args: str) -> str:
    done = subprocess.run(
        [CURL or "curl", "-sS", "--cacert", str(ca), "-o", "/dev/null",
         "-w", "%{http_version} %{http_code}", *args,
         f"https://localhost:{port}/health/live",
         "--resolve", f"localhost:{port}:127.0.0.1"],
        capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


CURL = shutil.which("curl")


@pytest.mark.skipif(not CURL, reason="needs curl")
def test_the_hardened_units_serve_tls_and_http2_with_write_execute_memory_denied(
        tmp_path, redis_server):
    for unit in UNITS:
        assert "\nMemoryDenyWriteExecute=yes\n" in unit.read_text(), unit
    try:
        under_restriction("pass")
    except subprocess.SubprocessError as e:
        pytest.skip(f"this kernel has no PR_SET_MDWE: {e}")
    # The restriction is the one that breaks pyOpenSSL's own ALPN callback.
    broken = under_restriction(
        "from OpenSSL import SSL\n"
        "SSL.Context(SSL.TLS_METHOD).set_alpn_select_callback(lambda c, p: b'h2')")
    assert "Cannot allocate write+execute memory for ffi.callback" in broken.stderr

    key, cert = make_certificate(tmp_path)
    ca = tmp_path / "ca.pem"
    proc = TwistdProcess("emojistream", "--listen", listen_tls(key, cert),
                         env={"REDIS_URL": redis_server.url}, restrict=deny_write_execute())
    try:
        port = proc.port()
        assert curl(port, ca, "--http2") == "2 200"
        assert curl(port, ca, "--http2", "--tls-max", "1.2") == "2 200"
        assert curl(port, ca, "--http1.1") == "1.1 200"
        assert curl(port, ca, "--http2", "--no-alpn") == "1.1 200"
    finally:
        code = proc.terminate()
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log() and "MemoryError" not in proc.log(), proc.log()
    assert "without ALPN" not in proc.log(), proc.log()


def test_without_any_way_to_make_the_alpn_callback_tls_goes_on_without_alpn(
        certificate, monkeypatch, logs):
    """Write+execute memory denied and a libffi without static trampolines: neither
    callback can be made; TLS still works, HTTP/1.1 only, and the start says so."""
    import ssl as stdlib_ssl
    import threading

    from OpenSSL import SSL

    from emojistream import tls

    def no_memory(*_args: object) -> None:
        raise MemoryError("Cannot allocate write+execute memory")

    monkeypatch.setattr(tls, "_SELECT", no_memory)
    monkeypatch.setattr(SSL.Context, "set_alpn_select_callback", no_memory)
    key, cert = certificate
    pair = ssl.PrivateCertificate.loadPEM(cert.read_bytes() + key.read_bytes())

    class Parsed:
        certificate, privateKey = pair.original, pair.privateKey.original
        extraCertChain, dhParameters = None, None

    server = tls.ServerTLS(Parsed, INTERMEDIATE_CIPHERS, [b"h2", b"http/1.1"])
    assert server.alpn is None
    assert any("TLS without ALPN" in line for line in logs.ours())
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()

        def accept() -> None:
            accepted, _ = listening.accept()
            connection = SSL.Connection(server.context, accepted)
            connection.set_accept_state()
            with contextlib.suppress(SSL.Error):
                connection.do_handshake()
            accepted.close()

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        context = stdlib_ssl.create_default_context(cafile=str(cert.parent / "ca.pem"))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with context.wrap_socket(socket.create_connection(listening.getsockname(), 10),
                                 server_hostname="localhost") as client:
            assert client.version() in ("TLSv1.2", "TLSv1.3")
            assert client.selected_alpn_protocol() is None
        thread.join(10)


# --- The request-head deadline closes TLS connections too


@implementer(IHandshakeListener)
class TLSConnection(RawConnection):
    """A client TLS connection that says when its handshake is done."""

    def __init__(self) -> None:
        super().__init__()
        self.handshake: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake.callback(None)


async def tls_connect(port: int, ca: Path, protocols: list[bytes] | None = None
                      ) -> TLSConnection:
    trust = ssl.Certificate.loadPEM(ca.read_bytes())
    options = ssl.optionsForClientTLS("localhost", trustRoot=trust,
                                      acceptableProtocols=protocols)
    conn = TLSConnection()
    await within(connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options),
                                 conn))
    await within(conn.handshake)
    return conn


#: Well under Twisted's 60-s idle timeout, which held TLS connections until now.
CLOSED_WITHIN = 5.0


def half_head_never_answering(port: int, ca: Path) -> tuple[bytes, float]:
    """Send half a request head over TLS, read the answer up to the server's
    close_notify without answering it, then wait for the TCP connection's end: what
    was received, and the seconds from the head to the TCP end."""
    import os
    import ssl as stdlib_ssl

    context = stdlib_ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=CLOSED_WITHIN + 5)
    with context.wrap_socket(raw, server_hostname="localhost") as client:
        client.sendall(b"GET /subscribe/eps HTTP/1.1\r\nHost: localhost\r\n")
        start = time.monotonic()
        received = b""
        while chunk := client.recv(4096):  # b"" at the close_notify
            received += chunk
        # The same descriptor at the TCP level, past TLS: b"" once the server closed.
        with socket.socket(fileno=os.dup(client.fileno())) as tcp:
            tcp.settimeout(CLOSED_WITHIN + 5)
            while tcp.recv(4096):
                pass
        return received, time.monotonic() - start


@pytest_twisted.ensureDeferred
async def test_the_request_deadline_closes_a_tls_connection(certificate, redis_server):
    key, cert = certificate
    ca = cert.parent / "ca.pem"
    env = {"REDIS_URL": redis_server.url, "REQUEST_TIMEOUT_SEC": "1"}
    async with running(env, {"listen": listen_tls(key, cert)}) as (d, _c):
        # Nothing sent after the handshake.
        silent = await tls_connect(d.port, ca)
        start = time.monotonic()
        await silent.wait_closed(CLOSED_WITHIN)
        assert silent.received == b""
        assert time.monotonic() - start >= 0.5  # the deadline, not something sooner

        # Half a request head: answered 408, then closed.
        half = await tls_connect(d.port, ca)
        half.transport.write(b"GET /subscribe/eps HTTP/1.1\r\nHost: localhost\r\n")
        await half.wait_closed(CLOSED_WITHIN)
        assert half.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), half.received

        # Half a head from a client that never answers the server's close_notify: the
        # TCP connection ends all the same.
        report = await threads.deferToThread(half_head_never_answering, d.port, ca)
        assert report[0].startswith(b"HTTP/1.1 408 "), report
        assert report[1] < CLOSED_WITHIN, report

        # ALPN h2, and no connection preface.
        h2 = await tls_connect(d.port, ca, [b"h2"])
        assert h2.transport.negotiatedProtocol == b"h2"
        await h2.wait_closed(CLOSED_WITHIN)

        # A request in time is still served, and the idle connection after it closed.
        served = await tls_connect(d.port, ca)
        served.transport.write(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await served.wait_closed(CLOSED_WITHIN)
        assert served.received.startswith(b"HTTP/1.1 200 "), served.received
        assert served.received.endswith(b"OK\n") or b"OK" in served.received
        assert len(d.app.gate._per_ip) == 0
