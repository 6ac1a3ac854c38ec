"""The daemon as a real twistd process: option errors, demo mode, the .tac file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import pytest_twisted

from daemonproc import TwistdProcess, serve_briefly, twistd
from emojistream.demo import free_port
from sseclient import Client

BAD_ENDPOINTS = [
    "tcp:abc", "tcp:99999", "unix:/nonexistent/dir/s", "ssl:8443:privateKey=/nonexistent.pem",
    "systemd:domain=INET:index=0", "bogus:1", "tcp:{busy}:interface=127.0.0.1",
]
BAD_VALUES = [  # environment variable, value
    ("REDIS_URL", "http://nope"), ("SSE_KEEPALIVE_SEC", "often"),
    ("ENABLE_RAW_STREAM", "perhaps"), ("ADMIN_REPORT", ""), ("PORT", "eighty"),
    ("PORT", "99999"), ("MAX_STREAMS", "-3"), ("GRAPHITE_URL", "ftp://x"),
]


@pytest.fixture
def busy_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def assert_one_line_failure(result, names: str) -> None:
    out = (result.stdout + result.stderr).strip()
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    lines = out.splitlines()
    assert len(lines) <= 3, out
    assert names in lines[-1], out


@pytest.mark.parametrize(("args", "names"), [
    (["--redis", "http://nope"], "--redis"),
    (["--keepalive", "often"], "--keepalive"),
    (["--workers", "2", "--listen", "tcp:0"], "--workers"),
    (["--workers", "2", "--listen", "unix:/tmp/emojistream-test.sock"], "--workers"),
    (["--workers", "2", "--demo"], "--workers"),
    (["--listen", "reuseport:0"], "--listen"),
    *[(["--listen", endpoint], "--listen") for endpoint in BAD_ENDPOINTS],
    *[(["--admin-listen", endpoint], "--admin-listen") for endpoint in BAD_ENDPOINTS],
])
def test_a_bad_option_is_a_one_line_error_and_a_failed_exit(args, names, busy_port):
    args = [a.replace("{busy}", str(busy_port)) for a in args]
    if "{busy}" not in " ".join(args) and "--admin-listen" in args:
        args += ["--listen", "tcp:0:interface=127.0.0.1"]
    result = twistd("-n", "--pidfile=", "emojistream", *args)
    assert_one_line_failure(result, "" if str(busy_port) in " ".join(args) else names)


@pytest.mark.parametrize("entry", ["plugin", "tac"])
@pytest.mark.parametrize(("name", "value"), [
    *BAD_VALUES,
    *[("ADMIN_LISTEN", endpoint) for endpoint in BAD_ENDPOINTS],
    ("PORT", "{busy}"),
])
def test_a_bad_environment_value_is_a_one_line_error_and_a_failed_exit(
        entry, name, value, busy_port):
    env = {name: value.replace("{busy}", str(busy_port))}
    if name == "ADMIN_LISTEN":
        env["PORT"] = "0"
    entry_args = ["emojistream"] if entry == "plugin" else ["-y", "emojistream.tac"]
    result = twistd("-n", "--pidfile=", *entry_args, env=env)
    assert_one_line_failure(result, "" if value == "{busy}" else name)


@pytest.fixture
def demo() -> Iterator[TwistdProcess]:
    proc = TwistdProcess("emojistream", "--demo", "--listen",
                         f"tcp:{free_port()}:interface=127.0.0.1")
    try:
        yield proc
    finally:
        proc.terminate()


@pytest_twisted.ensureDeferred
async def test_demo_serves_eps_and_details_and_stops_its_redis(demo):
    port = demo.port()
    demo.wait_for_line(r"Redis subscriber connection .* is up")
    (redis_pid,) = demo.children()
    client = Client(f"http://127.0.0.1:{port}")
    try:
        _, eps = await client.stream("/subscribe/eps")
        # The most used emoji gets several detail updates a second at 250 hits/s.
        _, details = await client.stream("/subscribe/details/1F602")
        await eps.wait_events(30)
        await details.wait_events(2)
        # What the README's first command says to open: the grid, and the admin page
        # whose cluster view (the admin report is on in demo mode) lists this node.
        response, page = await client.text("GET", "/")
        assert response.code == 200 and b"subscribe/eps" in page
        response, cluster = await client.text("GET", "/admin/cluster.json")
        assert response.code == 200 and isinstance(json.loads(cluster)["nodes"], list)
    finally:
        await client.close()
    for event in eps.events:
        summary = json.loads(event.data)
        assert summary and all(isinstance(v, int) and v > 0 for v in summary.values())
    for event in details.events:
        assert event.type == "stream.tweet_updates.1F602"
        tweet = json.loads(event.data)
        assert set(tweet) == {"id", "text", "screen_name", "name", "links",
                              "profile_image_url", "created_at"}
        assert "😂" in tweet["text"]
    # A requested stop that completes is a success.
    assert demo.terminate() == 0
    assert not os.path.exists(f"/proc/{redis_pid}") or _is_zombie(redis_pid)
    assert "Traceback" not in demo.log()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest_twisted.ensureDeferred
async def test_tac_builds_the_same_service_from_the_environment(redis_server):
    port = free_port()
    proc = TwistdProcess("-y", "emojistream.tac", env={
        "PORT": str(port), "REDIS_URL": redis_server.url, "NODE_NAME": "tac.1",
    })
    try:
        assert proc.port() == port
        proc.wait_for_line(r"Redis subscriber connection .* is up")
        client = Client(f"http://127.0.0.1:{port}")
        try:
            _response, body = await client.text("GET", "/admin/status.json")
        finally:
            await client.close()
        status = json.loads(body)
        assert status["node"] == "twisted-development-tac.1"
        assert status["status"] == "OK"
    finally:
        assert proc.terminate() == 0



def test_json_log_format_writes_one_object_per_line():
    proc = TwistdProcess("emojistream", "--log-format", "json",
                         "--listen", f"tcp:{free_port()}:interface=127.0.0.1",
                         "--redis", f"redis://127.0.0.1:{free_port()}")
    try:
        proc.port()
        proc.wait_for_line(r"unreachable")
    finally:
        proc.terminate()
    records = [json.loads(line) for line in proc.lines if line.strip()]
    assert len(records) >= 3
    for record in records:
        assert {"time", "level", "namespace", "message"} <= set(record)
    (warning,) = [r for r in records if "subscriber connection" in r["message"]
                  and "unreachable" in r["message"]]
    assert warning["level"] == "warn"
    assert warning["namespace"] == "emojistream.redisfeed.RedisFeed"


def test_a_default_start_logs_no_warning(redis_server):
    """Here the hard open-file limit is 20,000: the default --max-streams fits it."""
    proc = serve_briefly("emojistream", "--listen", "tcp:0:interface=127.0.0.1",
                         "--redis", redis_server.url)
    assert not [line for line in proc.lines if "#warn]" in line or "#error]" in line], \
        proc.log()


def test_a_stream_limit_the_open_file_limit_cannot_hold_is_one_warning(redis_server):
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit here")
    proc = TwistdProcess("emojistream", "--listen", "tcp:0:interface=127.0.0.1",
                         "--redis", redis_server.url, "--max-streams", str(hard))
    try:
        proc.port()
    finally:
        assert proc.terminate() == 0
    (warning,) = [line for line in proc.lines if "#warn]" in line]
    assert f"--max-streams {hard} needs {hard + 1024} descriptors" in warning


def test_the_tac_honours_log_format_json(redis_server):
    proc = serve_briefly("-y", "emojistream.tac", env={
        "PORT": "0", "REDIS_URL": redis_server.url, "LOG_FORMAT": "json"})
    records = [json.loads(line) for line in proc.lines if line.strip()]
    assert any("is up" in r["message"] for r in records)
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
