"""The daemon as a real twistd process: option errors, demo mode, the .tac file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import pytest_twisted

from badconfig import BAD_ENVIRONMENT, BAD_OPTIONS, full_environment, full_options, why
from daemonproc import TwistdProcess, serve_briefly, twistd
from emojistream.config import CONFIG_ERROR_EXIT
from emojistream.demo import free_port
from sseclient import Client

#: A sample of the refused settings run in real twistd processes: the glue, that the
#: one line reaches stderr alone and the status the shell, with no traceback.
#: Every case is checked in-process by test_config_exits.py, through the same
#: Options and .tac. Among these, --workers 1000 starts no thousand workers.
SAMPLE_OPTIONS = [(["--workers", "1000"], "--workers: "), (["--listen", "bogus:1"], "--listen")]
SAMPLE_ENVIRONMENT = [("plugin", "REDIS_URL", "http://nope"), ("tac", "WORKERS", "1000")]


def assert_one_line_failure(result, start: str, says: str = "") -> None:
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == CONFIG_ERROR_EXIT, out
    assert result.stdout == "", out
    (line,) = result.stderr.splitlines()
    assert line.startswith(start) and says in line, out


@pytest.mark.parametrize(("args", "names"), SAMPLE_OPTIONS)
def test_a_bad_option_is_a_one_line_error_and_a_failed_exit(args, names):
    assert (args, names) in BAD_OPTIONS
    result = twistd("-n", "--pidfile=", "emojistream", *full_options(args))
    assert_one_line_failure(result, f"twistd emojistream: {names}", why(*args))


@pytest.mark.parametrize(("entry", "name", "value"), SAMPLE_ENVIRONMENT)
def test_a_bad_environment_value_is_a_one_line_error_and_a_failed_exit(entry, name, value):
    assert (name, value) in BAD_ENVIRONMENT
    entry_args = ["emojistream"] if entry == "plugin" else ["-y", "emojistream.tac"]
    result = twistd("-n", "--pidfile=", *entry_args, env=full_environment(name, value))
    who = "twistd emojistream" if entry == "plugin" else "emojistream.tac"
    assert_one_line_failure(result, f"{who}: {name}: ", why(name, value))


@pytest.mark.parametrize("entry", ["plugin", "tac"])
@pytest.mark.parametrize("setting", ["--listen", "--admin-listen", "PORT", "ADMIN_LISTEN"])
@pytest.mark.parametrize("held_on", ["127.0.0.1", "0.0.0.0"])
def test_a_busy_port_is_one_line_at_listen_time_and_a_failed_exit(entry, setting, held_on):
    """The port is tried once, when the daemon listens (configuration only parses):
    one error line that names the endpoint and why, no traceback, a failed exit."""
    import socket

    if entry == "tac" and setting.startswith("--"):
        pytest.skip("the .tac takes the environment only")
    with socket.socket() as holder:
        holder.bind((held_on, 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        busy, free = f"tcp:{port}:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"
        args, env = [], {"REDIS_URL": "redis://127.0.0.1:1"}
        if setting == "--listen":
            args = ["--listen", busy]
        elif setting == "--admin-listen":
            args = ["--listen", free, "--admin-listen", busy]
        elif setting == "PORT":
            env["PORT"] = str(port)
        else:
            env.update(PORT="0", ADMIN_LISTEN=busy)
        entry_args = ["emojistream"] if entry == "plugin" else ["-y", "emojistream.tac"]
        result = twistd("-n", "--pidfile=", *entry_args, *args, env=env)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "cannot listen" in line.lower()]
    assert len(errors) == 1, out
    assert f"cannot listen on 'tcp:{port}" in errors[0], out
    assert "Address already in use" in errors[0], out
    assert [line for line in out.splitlines() if "error]" in line] == errors, out


def test_an_address_this_host_does_not_have_is_one_line_at_listen_time():
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this host.
    result = twistd("-n", "--pidfile=", "emojistream", "--listen",
                    "tcp:0:interface=192.0.2.1", env={"REDIS_URL": "redis://127.0.0.1:1"})
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in out, out
    (error,) = [line for line in out.splitlines() if "error]" in line]
    assert "cannot listen on 'tcp:0:interface=192.0.2.1'" in error, out
    assert "Cannot assign requested address" in error, out


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
