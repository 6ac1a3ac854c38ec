"""The daemon under systemd's own tools: sd_notify on a real NOTIFY_SOCKET datagram
socket, a socket passed by systemd-socket-activate, and the shipped units verified
by systemd-analyze."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from daemonproc import TwistdProcess, serve_briefly
from emojistream.demo import free_port


def test_sd_notify_ready_after_listening_watchdog_while_running_stopping_on_sigterm(
        tmp_path: Path, redis_server):
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(20)
    port = free_port()
    proc = TwistdProcess("emojistream", "--listen", f"tcp:{port}:interface=127.0.0.1",
                         "--redis", redis_server.url, "--drain-sec", "0.5",
                         env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    try:
        messages: list[str] = []
        # Each datagram, as it comes; READY=1 must find the port accepting.
        while not any(m.startswith("READY=1") for m in messages):
            messages.append(listener.recv(4096).decode())
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        ready = messages[-1]
        assert "STATUS=0 streams, Redis" in ready
        before_ready = messages[:-1]
        while sum(m.startswith("WATCHDOG=1") for m in messages) < len(before_ready) + 5:
            messages.append(listener.recv(4096).decode())
        # Pings come twice per WATCHDOG_USEC, and once ready they say how it goes.
        assert messages[-1].startswith("WATCHDOG=1\nSTATUS=")
        proc.proc.send_signal(signal.SIGTERM)
        while not messages[-1].startswith("STOPPING=1"):
            messages.append(listener.recv(4096).decode())
        assert proc.proc.wait(20) == 0
    finally:
        proc.terminate()
        listener.close()
    # The variables are not passed on to child processes (the embedded Redis).
    assert all(m.split("\n")[0] in ("READY=1", "WATCHDOG=1", "STOPPING=1") for m in messages)


def test_without_notify_socket_nothing_is_sent_and_nothing_fails(redis_server):
    proc = serve_briefly("emojistream", "--listen", "tcp:0:interface=127.0.0.1",
                         "--redis", redis_server.url)
    assert "notify" not in proc.log().lower()


ACTIVATE = "systemd-socket-activate"


@pytest.mark.skipif(not shutil.which(ACTIVATE), reason="needs systemd's systemd-socket-activate")
def test_a_socket_passed_by_systemd_socket_activate_serves_streams(redis_server):
    from daemonproc import TWISTD, repo_env

    port = free_port()
    proc = subprocess.Popen(
        [ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=http", "-E", "PYTHONPATH",
         TWISTD, "-n", "--pidfile=", "emojistream", "--listen",
         "systemd:domain=INET:index=0", "--redis", redis_server.url, "--drain-sec", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=repo_env())
    try:
        _wait_listening(proc)
        # The first connection starts the daemon, which adopts the socket it queues on.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"GET /subscribe/raw HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            assert head.startswith(b"HTTP/1.1 200 ")
            _publish_when_subscribed(proc, redis_server.port, conn, b"data:2665")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def _wait_listening(proc: subprocess.Popen[str]) -> None:
    """systemd-socket-activate's first line says it listens."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("Listening on"), line


def _publish_when_subscribed(proc: subprocess.Popen[str], redis_port: int,
                             conn: socket.socket, wanted: bytes) -> None:
    """Once the daemon's log says it is subscribed, publish a hit; wait for the stream
    to show it."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Redis subscriber connection" in line and "is up" in line:
            break
    with socket.create_connection(("127.0.0.1", redis_port)) as redis:
        redis.sendall(b"PUBLISH stream.score_updates 2665\r\n")
        assert redis.recv(100) == b":1\r\n"
    received = b""
    while wanted not in received:
        chunk = conn.recv(4096)
        assert chunk, received
        received += chunk


@pytest.mark.skipif(not shutil.which(ACTIVATE), reason="needs systemd's systemd-socket-activate")
@pytest.mark.parametrize(("activate", "missing"), [
    ([ACTIVATE, "-l", "127.0.0.1:{port}"], "without LISTEN_FDNAMES"),
    ([], "no socket was passed"),
])
def test_a_systemd_endpoint_without_its_socket_is_a_one_line_error(activate, missing):
    from daemonproc import TWISTD, repo_env

    port = free_port()
    command = [a.format(port=port) for a in activate] + [
        TWISTD, "-n", "--pidfile=", "emojistream", "--listen", "systemd:domain=INET:index=0"]
    if activate:
        command[len(activate):len(activate)] = ["-E", "PYTHONPATH"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=repo_env())
    try:
        if activate:
            _wait_listening(proc)
            # systemd-socket-activate starts the command on the first connection.
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        out, _ = proc.communicate(timeout=30)

    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # systemd-socket-activate's own lines aside, the daemon says one line.
    lines = [line for line in out.strip().splitlines()
             if not line.startswith(("Communication attempt", "Execing "))]
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert len(lines) == 1 and missing in lines[0], out


UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
ANALYZE = shutil.which("systemd-analyze")


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ANALYZE or "systemd-analyze", "verify", f"--root={root}",
                           str(root / "etc/systemd/system" / unit)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A file system root holding the shipped units, systemd's own units, and an
    executable where the units expect the installed twistd."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system",
                    symlinks=True)
    twistd = root / "opt/emojistream/bin/twistd"
    twistd.parent.mkdir(parents=True)
    twistd.write_text("#!/bin/sh\n")
    twistd.chmod(0o755)
    shutil.copytree(UNITS, root / "etc/systemd/system")
    return root


@pytest.mark.skipif(not ANALYZE or not Path("/usr/lib/systemd/system").is_dir(),
                    reason="needs systemd's systemd-analyze")
@pytest.mark.parametrize("unit", ["emojistream.service", "emojistream@1.socket",
                                  "emojistream@1.service"])
def test_systemd_analyze_verify_passes_on_every_shipped_unit(unit_root: Path, unit: str):
    shipped = {p.name for p in UNITS.iterdir() if p.suffix in (".service", ".socket")}
    assert shipped == {"emojistream.service", "emojistream@.socket", "emojistream@.service"}
    result = _verify(unit_root, unit)
    # verify exits 0 on settings it could not parse and ignores: those lines count too.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)
    # And it does notice a broken setting, so the check above can fail.
    path = unit_root / "etc/systemd/system" / unit.replace("@1", "@")
    path.write_text(path.read_text().replace("[Install]", "Bogus=1\n[Install]"))
    broken = _verify(unit_root, unit)
    assert "Bogus" in broken.stdout + broken.stderr
