"""The daemon under systemd's own tools: sd_notify on a real NOTIFY_SOCKET datagram
socket, a socket passed by systemd-socket-activate, and the shipped units verified
by systemd-analyze."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.web.resource import Resource

from conftest import REPO, repo_env
from daemonproc import TWISTD, TwistdProcess, serve_briefly
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


UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"


def unit_values(unit: str, key: str) -> list[str]:
    """The values of C{key=} lines in a shipped unit file, in order (comments and
    section headers aside; no unit here continues a line)."""
    values = []
    for line in (UNITS / unit).read_text().splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and not name.startswith(("#", ";")) and name.strip() == key:
            values.append(value.strip())
    return values


def unit_value(unit: str, key: str) -> str:
    """The one value of C{key=} in a shipped unit file."""
    values = unit_values(unit, key)
    assert len(values) == 1, (unit, key, values)
    return values[0]


def exec_start(unit: str) -> list[str]:
    """A shipped service's C{ExecStart=} command line, run with this checkout's
    twistd in place of the installed one."""
    argv = shlex.split(unit_value(unit, "ExecStart"))
    assert argv[0] == "/opt/emojistream/bin/twistd", argv
    return [TWISTD, *argv[1:]]


def listen_stream_on(port: int) -> str:
    """The socket unit's own C{ListenStream=} value, with C{port} for its port
    (systemd-socket-activate -l parses it as systemd does: a bare port is [::]:PORT,
    dual-stack)."""
    value = unit_value("emojistream@.socket", "ListenStream")
    match = re.fullmatch(r"(.*?)(\d+)", value)
    assert match, value
    return match.group(1) + str(port)


class ActivatedProcess(TwistdProcess):
    """A command under systemd-socket-activate (which execs it at the first
    connection), its output collected line by line as L{TwistdProcess} does."""

    def __init__(self, command: list[str]) -> None:
        # Not super().__init__(), which would start twistd itself.
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=repo_env(),
                                     cwd=REPO)
        self.lines = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()


def _exchange(port: int, request: bytes) -> bytes:
    """One request on its own connection (C{Connection: close}); all that comes back
    until the server closes, b"" for a connection closed unanswered."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        received = b""
        try:
            conn.sendall(request)
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def _open_stream(port: int, path: str) -> tuple[socket.socket, bytes]:
    """A stream held open (its connection ends with it); returns it and its response
    head."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        assert chunk, head
        head += chunk
    return conn, head


def _body_json(response: bytes) -> Any:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), response
    if b"transfer-encoding: chunked" in head.lower():
        decoded = b""
        while True:
            size, _, rest = body.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            decoded, body = decoded + rest[:int(size, 16)], rest[int(size, 16) + 2:]
        body = decoded
    return json.loads(body)


@pytest.mark.skipif(not shutil.which(ACTIVATE), reason="needs systemd's systemd-socket-activate")
@pytest.mark.skipif(Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() != "0",
                    reason="systemd-socket-activate makes [::] dual-stack only when the "
                           "host's default is (the socket unit says BindIPv6Only=both)")
def test_the_shipped_socket_and_service_record_ipv4_clients_as_ipv4(redis_server):
    """emojistream@.socket's ListenStream= and emojistream@.service's ExecStart=, as
    shipped (a free port for 8001): four streams from 127.0.0.1 under
    MAX_STREAMS_PER_IP=1, status.json, cleanup, the log and the per-connection gate
    (MAX_CONNECTIONS_PER_IP=3) all see one client, 127.0.0.1."""
    port = free_port()
    fdname = unit_value("emojistream@.socket", "FileDescriptorName")
    command = [ACTIVATE, "-l", listen_stream_on(port), f"--fdname={fdname}", "-E", "PYTHONPATH",
               "-E", "MAX_STREAMS_PER_IP=1", "-E", "MAX_CONNECTIONS_PER_IP=3",
               *exec_start("emojistream@.service"),
               "--redis", redis_server.url, "--drain-sec", "0.5", "--verbose"]
    proc = ActivatedProcess(command)
    streams: list[socket.socket] = []
    try:
        # Bound as the unit would: a bare port is [::]:PORT.
        proc.wait_for_line(rf"^Listening on \[::\]:{port} as 3\.$")
        # The first connection starts the daemon, which adopts the socket it queues on.
        first, head = _open_stream(port, "/subscribe/raw")
        streams.append(first)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert proc.wait_for_line(r"Serving HTTP on (\S+)$").group(1) == f"[::]:{port}"
        # One stream per address: the three others from 127.0.0.1 are refused.
        for _ in range(3):
            refused = _exchange(port, _get("/subscribe/raw"))
            assert refused.startswith(b"HTTP/1.1 429 "), refused
        proc.wait_for_line(r"connect /subscribe/raw from 127\.0\.0\.1$")
        _publish_when_subscribed(proc, redis_server.port, first, b"data:2665")

        # status.json is built at most once a second: ask until it lists the stream.
        deadline = time.monotonic() + 15
        while True:
            status = _body_json(_exchange(port, _get("/admin/status.json")))
            if status["connections"] or time.monotonic() > deadline:
                break
        assert [c["client_ip"] for c in status["connections"]] == ["127.0.0.1"], status

        cleanup = _exchange(port, b"POST /subscribe/cleanup/scores HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        assert _body_json(cleanup) == {"status": "OK", "closed": 1}
        while first.recv(65536):  # the stream ends, and its connection with it
            pass
        proc.wait_for_line(r"cleanup closed 1 stream\(s\) of 127\.0\.0\.1$")

        # Every connection so far was closed by the daemon. The gate counts three idle
        # ones as one address's three; a fourth, accepted after them, is closed
        # unanswered.
        streams += [socket.create_connection(("127.0.0.1", port), timeout=30)
                    for _ in range(3)]
        assert _exchange(port, _get("/health/live")) == b""
    finally:
        for conn in streams:
            conn.close()
        code = proc.terminate()
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log()
    assert "::ffff:" not in proc.log()


def _wait_listening(proc: subprocess.Popen[str]) -> None:
    """systemd-socket-activate's first line says it listens."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("Listening on"), line


def _publish_when_subscribed(proc: TwistdProcess, redis_port: int,
                             conn: socket.socket, wanted: bytes) -> None:
    """Once the daemon's log says it is subscribed, publish a hit; wait for the stream
    to show it."""
    proc.wait_for_line(r"Redis subscriber connection .* is up")
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
    from daemonproc import TWISTD

    port = free_port()
    command = [a.format(port=port) for a in activate] + [
        TWISTD, "-n", "--pidfile=", "emojistream", "--listen", "systemd:domain=INET:index=0"]
    if activate:
        command[len(activate):len(activate)] = ["-E", "PYTHONPATH"]
    code, out, lines = _run_to_its_end(command, port if activate else None)
    # systemd-socket-activate's own lines aside, the daemon says one line.
    assert code != 0 and "Traceback" not in out, out
    assert len(lines) == 1 and missing in lines[0], out


def _run_to_its_end(command: list[str], port: int | None) -> tuple[int, str, list[str]]:
    """Run C{command} until it exits (under systemd-socket-activate when C{port} is
    given: the first connection starts it); its exit status, its output, and the lines
    that are not the tool's own."""
    from daemonproc import repo_env

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=repo_env())
    try:
        if port is not None:
            _wait_listening(proc)
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = [line for line in out.strip().splitlines()
             if not line.startswith(("Communication attempt", "Execing "))]
    return proc.returncode, out, lines


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
                                  "emojistream@1.service", "emojistream-bridge.service"])
def test_systemd_analyze_verify_passes_on_every_shipped_unit(unit_root: Path, unit: str):
    shipped = {p.name for p in UNITS.iterdir() if p.suffix in (".service", ".socket")}
    assert shipped == {"emojistream.service", "emojistream@.socket", "emojistream@.service",
                       "emojistream-bridge.service"}
    result = _verify(unit_root, unit)
    # verify exits 0 on settings it could not parse and ignores: those lines count too.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)
    # And it does notice a broken setting, so the check above can fail.
    path = unit_root / "etc/systemd/system" / unit.replace("@1", "@")
    path.write_text(path.read_text().replace("[Install]", "Bogus=1\n[Install]"))
    broken = _verify(unit_root, unit)
    assert "Bogus" in broken.stdout + broken.stderr


def test_v4_mapped_addresses_are_one_ipv4_address_everywhere():
    """The one normalisation (L{plain_ip}) under the gate, the peer's address and the
    address a trusted proxy reports: a v4-mapped address is its IPv4 address, and
    nothing else changes."""
    from twisted.internet.address import IPv6Address
    from twisted.web.test.requesthelper import DummyRequest

    from emojistream.http import ConnectionGate, QuietSite, plain_ip
    from emojistream.web import ForwardedFor, peer_ip

    assert [plain_ip(a) for a in ("::ffff:127.0.0.1", "::FFFF:7f00:1", "[::ffff:10.0.0.1]",
                                  "127.0.0.1", "::1", "2001:db8::1", "fe80::1%eth0",
                                  "::ffff:nonsense", "name.example", "")] == [
        "127.0.0.1", "127.0.0.1", "10.0.0.1",
        "127.0.0.1", "::1", "2001:db8::1", "fe80::1%eth0",
        "::ffff:nonsense", "name.example", ""]

    gate = ConnectionGate(per_ip=1)
    site = QuietSite(Resource(), gate=gate)
    first = site.buildProtocol(IPv6Address("TCP", "::ffff:127.0.0.1", 40000))
    assert first.gate_host == "127.0.0.1"
    assert site.buildProtocol(IPv6Address("TCP", "::ffff:127.0.0.1", 40001)) is None
    assert site.buildProtocol(IPv6Address("TCP", "::1", 40002)) is not None

    request = DummyRequest([b""])
    request.client = IPv6Address("TCP", "::ffff:192.0.2.7", 40003)
    assert peer_ip(request) == "192.0.2.7"
    request.requestHeaders.setRawHeaders(b"X-Real-IP", [b"::ffff:203.0.113.9"])
    assert ForwardedFor("X-Real-IP")(request) == "203.0.113.9"


@pytest.mark.skipif(not shutil.which(ACTIVATE), reason="needs systemd's systemd-socket-activate")
def test_a_systemd_domain_other_than_the_sockets_is_a_one_line_config_error():
    """The socket unit's own IPv6 socket adopted as IPv4 (the old shipped service)
    would garble every address: the start stops, saying what to give."""
    port = free_port()
    command = [ACTIVATE, "-l", listen_stream_on(port), "--fdname=http", "-E", "PYTHONPATH",
               TWISTD, "-n", "--pidfile=", "emojistream", "--listen",
               "systemd:domain=INET:index=0"]
    code, out, lines = _run_to_its_end(command, port)
    assert len(lines) == 1 and "Traceback" not in out, out
    assert "is AF_INET6" in lines[0] and lines[0].endswith("give domain=INET6"), out
    assert code == _restart_prevented(), out


def _restart_prevented() -> int:
    """The exit status both shipped service units keep systemd from restarting."""
    codes = {unit_value(unit, "RestartPreventExitStatus")
             for unit in ("emojistream.service", "emojistream@.service")}
    assert len(codes) == 1 and all(c.isdigit() for c in codes), codes
    return int(codes.pop())


def test_a_setting_that_cannot_work_exits_with_the_status_the_units_do_not_restart(tmp_path):
    """A bad setting, as a flag or in the environment, to the units' own command line
    and to the .tac: one line and the status named in RestartPreventExitStatus=. A
    port that is only busy exits otherwise, so Restart=on-failure retries it."""
    code = _restart_prevented()
    assert code != 1  # what a crash (a traceback) exits with
    runs = {
        "flag": ([*exec_start("emojistream.service"), "--keepalive", "-1"], {}),
        "environment": (exec_start("emojistream.service"), {"SSE_KEEPALIVE_SEC": "-1"}),
        "worker unit": (exec_start("emojistream@.service"), {"MAX_STREAMS": "-3"}),
        ".tac": ([TWISTD, "-ny", str(REPO / "emojistream.tac"), "--pidfile="],
                 {"SSE_KEEPALIVE_SEC": "-1"}),
    }
    for name, (command, settings) in runs.items():
        env = {**repo_env(), "PORT": "0", **settings}
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=60)
        out = (result.stdout + result.stderr).strip()
        assert result.returncode == code, (name, result.returncode, out)
        assert len(out.splitlines()) == 1 and "Traceback" not in out, (name, out)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        result = subprocess.run(
            [*exec_start("emojistream.service"), "--listen",
             f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"],
            capture_output=True, text=True, env=repo_env(), cwd=tmp_path, timeout=60)
    # Said at listen time, in the daemon's log (stdout under -n), no longer a setting.
    assert "in use" in result.stdout + result.stderr, result
    assert result.returncode not in (0, code), result


ENV_FILE = UNITS / "emojistream.env"
ENV_GENERATOR = Path("/usr/lib/systemd/user-environment-generators/"
                    "30-systemd-environment-d-generator")


@pytest.mark.skipif(not ENV_GENERATOR.exists(), reason="needs systemd's environment.d generator")
def test_every_setting_of_the_shipped_env_file_uncommented_is_accepted(tmp_path: Path):
    """Each NAME=VALUE line of emojistream.env, commented out or not, uncommented and
    read by systemd's own env-file parser (that of EnvironmentFile=, here through the
    environment.d generator), is a value the daemon accepts: no comment after a
    value."""
    lines = {}
    for line in ENV_FILE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*=.*)", line)
        if match:
            lines[match.group(1).partition("=")[0]] = match.group(1)
    assert {"REDIS_URL", "PORT", "TRUST_PROXY", "SSE_DRAIN_SEC", "ADMIN_TOKEN"} <= set(lines)
    # systemd's parser drops an empty assignment; the daemon is not asked about it.
    blank = {name for name, line in lines.items() if line == name + "="}
    config = tmp_path / "environment.d"
    config.mkdir()
    (config / "emojistream.conf").write_text(
        "".join(line + "\n" for name, line in lines.items() if name not in blank))
    out = subprocess.run([str(ENV_GENERATOR)], capture_output=True, text=True, check=True,
                         env={"XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)},
                         timeout=30).stdout
    parsed = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        if name in lines:
            parsed[name] = shlex.split(value)[0] if value else ""
    assert set(parsed) == set(lines) - blank, out
    assert not [v for v in parsed.values() if "#" in v], parsed
    from emojistream.config import resolve

    # The shipped ports may be taken on this host: free ones instead, nothing else.
    env = {name: re.sub(r"\b800[12]\b", lambda _: str(free_port()), value)
           for name, value in parsed.items()}
    settings = resolve(env, {})
    assert settings.trust_proxy and settings.env == "production"
    # Nothing is left for the operator to fill in but the token, which has no safe
    # example value.
    assert blank == {"ADMIN_TOKEN"}, blank


def test_the_documentation_the_units_name_is_what_the_documented_install_creates(
        tmp_path: Path):
    """Run the install lines of docs/DEPLOYMENT.md that write files (install, cp),
    under a scratch root: every Documentation= of the shipped units is then there."""
    text = (REPO / "docs" / "DEPLOYMENT.md").read_text()
    block = text.split("## Install", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.startswith(("install ", "cp "))]
    assert commands, block
    root = tmp_path / "root"
    script = "\n".join(commands).replace("/opt/emojistream", f"{root}/opt/emojistream") \
        .replace("/etc/emojistream", f"{root}/etc/emojistream")
    subprocess.run(["bash", "-e", "-c", script], cwd=REPO, check=True, timeout=30)
    for unit in ("emojistream.service", "emojistream@.service", "emojistream@.socket",
                 "emojistream-bridge.service"):
        for url in unit_values(unit, "Documentation"):
            for link in url.split():
                assert link.startswith("file:///"), (unit, link)
                assert (root / link.removeprefix("file:///")).is_file(), (unit, link)
    assert (root / "etc/emojistream/emojistream.env").read_text() == ENV_FILE.read_text()
