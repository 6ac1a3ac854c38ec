"""Settings from environment and options, and the twistd Options around them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import fields, replace

import pytest
from twisted.python import usage

from conftest import REPO, repo_env
from emojistream.config import (
    DEFAULT_PORT,
    SPECS,
    ConfigError,
    RedisAddress,
    Settings,
    Spec,
    listen_address,
    parse_bool,
    parse_redis_url,
    resolve,
)
from emojistream.connection import backoff
from emojistream.tap import Options


def options(argv: list[str], env: dict[str, str] | None = None) -> Options:
    opts = Options(environ=env or {})
    opts.parseOptions(argv)
    return opts


def test_defaults_without_environment():
    s = resolve({"NODE_NAME": "web.1"}, {})
    assert s.listen == "tcp:8001:backlog=1024"
    assert s.redis == RedisAddress("localhost", 6379, None, None, 0)
    assert s.raw_stream is True and s.verbose is False and s.demo is False
    assert s.keepalive == 15.0
    assert s.env == "development"
    assert s.node_name == "twisted-development-web.1"


def test_environment_is_read_with_the_legacy_names():
    env = {"PORT": "9000", "REDIS_URL": "redis://:pw@redis.example:6380/2",
           "ENABLE_RAW_STREAM": "No", "VERBOSE": "YES", "RACK_ENV": "production",
           "DYNO": "web.3", "SSE_KEEPALIVE_SEC": "2.5"}
    s = resolve(env, {})
    assert s.listen == "tcp:9000:backlog=1024"
    assert s.redis == RedisAddress("redis.example", 6380, "pw", None, 2)
    assert s.raw_stream is False and s.verbose is True
    assert s.node_name == "twisted-production-web.3"
    assert s.keepalive == 2.5
    assert resolve({"NODE_NAME": "n", "DYNO": "d"}, {}).node == "n"


def test_options_override_the_environment():
    env = {"PORT": "9000", "REDIS_URL": "redis://a:1", "ENABLE_RAW_STREAM": "false"}
    opts = options(["--listen", "tcp:7000:interface=127.0.0.1", "--redis",
                    "redis://b:2/5", "--raw-stream", "--keepalive", "3"], env)
    s = opts.settings
    assert s is not None
    assert s.listen == "tcp:7000:interface=127.0.0.1"
    assert (s.redis.host, s.redis.port, s.redis.db) == ("b", 2, 5)
    assert s.raw_stream is True and s.keepalive == 3.0
    off = options(["--no-raw-stream"], {"ENABLE_RAW_STREAM": "true"}).settings
    assert off is not None and off.raw_stream is False


@pytest.mark.parametrize("word", ["true", "T", "Yes", "y", "1", "TRUE"])
def test_true_words(word):
    assert parse_bool(word) is True


@pytest.mark.parametrize("word", ["false", "F", "no", "N", "0"])
def test_false_words(word):
    assert parse_bool(word) is False


@pytest.mark.parametrize("word", ["", " ", "perhaps"])
def test_an_empty_or_unknown_boolean_is_an_error_not_false(word):
    with pytest.raises(ValueError):
        parse_bool(word)


def test_redis_urls():
    assert parse_redis_url("redis://h") == RedisAddress("h", 6379, None, None, 0)
    assert parse_redis_url("redis://user:p%40ss@h:1/9") == RedisAddress("h", 1, "p@ss", "user", 9)
    assert parse_redis_url("redis://secret@h") == RedisAddress("h", 6379, "secret", None, 0)
    assert "p@ss" not in str(parse_redis_url("redis://:p%40ss@h"))
    for bad in ("http://h", "redis://h:notaport", "redis://h/x", "h:6379", "redis://h:99999"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


@pytest.mark.parametrize(("env", "argv", "message"), [
    ({"REDIS_URL": "nope"}, [], "REDIS_URL"),
    ({}, ["--redis", "redis://h:x"], "--redis"),
    ({"ENABLE_RAW_STREAM": "maybe"}, [], "ENABLE_RAW_STREAM"),
    ({}, ["--keepalive", "soon"], "--keepalive"),
    ({}, ["--keepalive", "0"], "--keepalive"),
    ({}, ["--listen", "bogus:1"], "--listen"),
    ({}, ["--listen", "tcp:notaport"], "--listen"),
    ({"PORT": "http"}, [], "PORT"),
    ({}, ["--raw-stream", "--no-raw-stream"], "contradict"),
    ({"GRAPHITE_URL": "http://h:2003"}, [], "GRAPHITE_URL"),
    ({}, ["--graphite", "tcp://"], "--graphite"),
    ({"HOSTEDGRAPHITE_APIKEY": "a key"}, [], "HOSTEDGRAPHITE_APIKEY"),
    ({"SSE_SCORE_RETRY_MS": "-1"}, [], "SSE_SCORE_RETRY_MS"),
    ({"SSE_DETAIL_FORCECLOSE_SEC": "never"}, [], "SSE_DETAIL_FORCECLOSE_SEC"),
    ({"LOG_FORMAT": "xml"}, [], "LOG_FORMAT"),
    ({"ADMIN_REPORT": ""}, [], "ADMIN_REPORT"),
    ({}, ["--listen", "tcp:99999"], "--listen"),
])
def test_bad_values_are_one_line_usage_errors(env, argv, message):
    # A bad value ends twistd with the line alone (SystemExit), not after twistd's
    # whole option list (UsageError); contradicting flags are a usage error.
    with pytest.raises((usage.UsageError, SystemExit)) as info:
        options(argv, env)
    text = str(info.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize(("env", "argv", "policy"), [
    ({}, [], "adaptive"),
    ({"SSE_WRITE_POLICY": "Direct"}, [], "direct"),
    ({}, ["--write-policy", "batch"], "batch"),
    # --batch-writes is kept: it says --write-policy batch, --no-batch-writes "not batch".
    ({}, ["--batch-writes"], "batch"),
    ({"SSE_BATCH_WRITES": "yes"}, [], "batch"),
    ({"SSE_BATCH_WRITES": "yes"}, ["--no-batch-writes"], "adaptive"),
    ({"SSE_BATCH_WRITES": "no", "SSE_WRITE_POLICY": "direct"}, [], "direct"),
    ({"SSE_BATCH_WRITES": "yes", "SSE_WRITE_POLICY": "batch"}, [], "batch"),
    # An option wins over the environment, whichever of the two names it uses.
    ({"SSE_BATCH_WRITES": "yes"}, ["--write-policy", "direct"], "direct"),
    ({"SSE_WRITE_POLICY": "direct"}, ["--batch-writes"], "batch"),
    ({"SSE_WRITE_POLICY": "batch"}, ["--no-batch-writes"], "adaptive"),
])
def test_the_write_policy_and_its_old_name(env, argv, policy):
    settings = options(argv, env).settings
    assert settings is not None and settings.write_policy == policy


@pytest.mark.parametrize(("env", "argv", "message"), [
    ({}, ["--write-policy", "fastest"], "--write-policy: 'fastest' is not a write policy"),
    ({}, ["--write-policy", "direct", "--batch-writes"],
     "--batch-writes contradicts --write-policy direct"),
    ({}, ["--write-policy", "batch", "--no-batch-writes"],
     "--no-batch-writes contradicts --write-policy batch"),
    ({"SSE_WRITE_POLICY": "adaptive", "SSE_BATCH_WRITES": "1"}, [],
     "SSE_BATCH_WRITES=1 contradicts SSE_WRITE_POLICY=adaptive"),
])
def test_a_write_policy_that_contradicts_batch_writes_is_one_line(env, argv, message):
    with pytest.raises(SystemExit) as info:
        options(argv, env)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert info.value.code == 78


def test_legacy_settings_and_their_defaults():
    s = resolve({}, {})
    assert (s.force_refresh, s.score_retry_ms, s.detail_retry_ms) == (False, 100, 500)
    assert (s.score_max_age, s.detail_max_age) == (300.0, 300.0)
    assert (s.trust_proxy, s.kiosk_stream, s.graphite, s.graphite_prefix) == (
        False, False, None, "")
    t = resolve({"SSE_FORCE_REFRESH": "t", "GRAPHITE_URL": "udp://carbon", "TRUST_PROXY": "1",
                 "HOSTEDGRAPHITE_APIKEY": "abc-123", "ENABLE_KIOSK_INTERACTION_STREAM": "y"},
                {})
    assert t.force_refresh and t.trust_proxy and t.kiosk_stream
    assert str(t.graphite) == "udp://carbon:2003" and t.graphite_prefix == "abc-123"


def test_config_error_names_the_source():
    with pytest.raises(ConfigError, match="VERBOSE"):
        resolve({"VERBOSE": "loud"}, {})


def test_backoff_is_capped_and_jittered():
    lows = [backoff(n, rand=lambda: 0.0) for n in range(1, 12)]
    highs = [backoff(n, rand=lambda: 1.0) for n in range(1, 12)]
    assert highs[0] == pytest.approx(0.1) and lows[0] == pytest.approx(0.05)
    assert max(highs) == 5.0 and highs[-1] == 5.0 and lows[-1] == 2.5
    assert highs == sorted(highs)
    assert backoff(10_000) <= 5.0


def test_event_ids_with_workers_warn_that_resumes_need_sticky_routing(logs):
    options(["--workers", "2", "--event-ids", "--listen", "tcp:8001"])
    assert any("--event-ids with --workers 2" in line and "sticky routing" in line
               for line in logs.ours())
    logs.events.clear()
    options(["--workers", "2", "--listen", "tcp:8001"])
    options(["--event-ids"])
    assert not any("sticky" in line for line in logs.ours())


def test_resume_settings_and_their_defaults():
    s = resolve({}, {})
    assert (s.event_ids, s.replay_events, s.replay_age, s.replay_bytes) == (
        False, 10_000, 300.0, 32 << 20)
    assert s.demo_page is False and s.admin_report is False
    demo = resolve({"SSE_EVENT_IDS": "yes", "SSE_REPLAY_EVENTS": "5", "SSE_REPLAY_SEC": "2.5",
                    "SSE_REPLAY_BYTES": "4096"}, {"demo": "true"})
    assert (demo.event_ids, demo.replay_events, demo.replay_age, demo.replay_bytes) == (
        True, 5, 2.5, 4096)
    assert demo.demo_page is True and demo.admin_report is True
    assert resolve({"DEMO_PAGE": "no"}, {"demo": "true"}).demo_page is False
    with pytest.raises(ConfigError, match="SSE_REPLAY_BYTES"):
        resolve({"SSE_REPLAY_BYTES": "0"}, {})


@pytest.mark.slow  # holds a real port
def test_a_busy_port_is_no_configuration_error():
    """Configuration only parses: with the port held, on one address or on all, the
    settings resolve; the listener says it is busy when the daemon starts (one line,
    test_twistd). Binding to check made the suite fail whenever the demo ran."""
    with socket.socket() as loopback, socket.socket() as every:
        loopback.bind(("127.0.0.1", 0))
        loopback.listen(1)
        every.bind(("0.0.0.0", 0))
        every.listen(1)
        for port in (loopback.getsockname()[1], every.getsockname()[1]):
            assert resolve({"PORT": str(port)}, {}).listen == f"tcp:{port}:backlog=1024"
            s = options(["--listen", f"tcp:{port}:interface=127.0.0.1",
                         "--admin-listen", f"tcp:{port}"]).settings
            assert s is not None and s.admin_listen == f"tcp:{port}"


@pytest.mark.slow  # holds a real port
def test_the_default_port_held_elsewhere_is_no_configuration_error():
    """The README's first command (the demo, on 8001) running beside the tests: the
    defaults resolve whether this test holds 8001 or something else already does."""
    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", DEFAULT_PORT))
            holder.listen(1)
        except OSError:
            pass  # held already: the case under test all the same
        assert resolve({}, {}).listen == f"tcp:{DEFAULT_PORT}:backlog=1024"
        assert options([]).settings is not None


@pytest.mark.slow
def test_configuration_opens_no_socket_and_imports_no_reactor(tmp_path):
    """Settings in, Settings out: Python's audit hooks see every socket made, bound or
    connected while every kind of endpoint is resolved, in a fresh interpreter."""
    code = f"""
import json, sys
events = []
sys.addaudithook(lambda event, args: events.append(event)
                 if event.startswith("socket.") else None)
from emojistream.config import resolve
resolve({{"NODE_NAME": "n"}}, {{}})
for endpoint in ("tcp:{DEFAULT_PORT}", "tcp:{DEFAULT_PORT}:interface=127.0.0.1",
                 "tcp6:{DEFAULT_PORT}:interface=\\:\\:1", "reuseport:{DEFAULT_PORT}",
                 "unix:{tmp_path}/s"):
    resolve({{"NODE_NAME": "n", "ADMIN_LISTEN": endpoint}}, {{"listen": endpoint}})
print(json.dumps({{"events": events,
                  "reactor": "twisted.internet.reactor" in sys.modules}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=repo_env(), cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen == {"events": [], "reactor": False}


def test_listen_address_reads_the_endpoint_without_listening():
    assert listen_address("tcp:8001") == (8001, "", 50)
    assert listen_address("tcp:8001:interface=127.0.0.1:backlog=1024") == (
        8001, "127.0.0.1", 1024)
    assert listen_address("tcp6:8002:interface=\\:\\:1") == (8002, "::1", 50)
    assert listen_address("unix:/tmp/x.sock") is None
    with pytest.raises(ValueError):
        listen_address("tcp:eighty")


def test_settings_defaults_are_what_nothing_given_resolves_to():
    """Each default is written once, in SPECS: Settings() is what an empty environment
    and an empty command line give, derived defaults (listen, node, the stream limit,
    admin report, demo page) and the absent token included."""
    assert Settings() == resolve({}, {})
    assert Settings() == options([]).settings
    assert {f.name for f in fields(Settings)} == {spec.key for spec in SPECS} | {
        "redis_given"}


def test_help_shows_the_default_settings_use():
    """--help renders each fixed default from the table, and it is what Settings holds;
    the listen default it spells out is Settings' own."""
    helps = str(Options(environ={}))
    for spec in SPECS:
        if spec.shown_default is not None:
            assert spec.parse(spec.shown_default) == getattr(Settings(), spec.key), spec.key
            assert f"default {spec.shown_default}]" in " ".join(helps.split()), spec.key
    (listen,) = (spec for spec in SPECS if spec.key == "listen")
    assert f"else {Settings().listen})" in listen.help
    assert "metavar" not in {f.name for f in fields(Spec)}


def test_a_default_changed_in_the_table_changes_settings_and_resolve(monkeypatch):
    """The table is the only place: a default changed there is the one Settings() and
    resolve() use, with nothing else to keep in step."""
    import emojistream.config as config

    changed = tuple(replace(spec, default="7") if spec.key == "keepalive" else spec
                    for spec in SPECS)
    monkeypatch.setattr(config, "SPECS", changed)
    assert Settings().keepalive == 7.0 == resolve({}, {}).keepalive


#: Settings with a bound: option, environment variable, a value past it, the message,
#: and the bound itself (accepted).
BOUNDS = [
    ("workers", "WORKERS", "1000", "at most 64", "64"),
    ("keepalive", "SSE_KEEPALIVE_SEC", "1e-7", "at least 0.05 s", "0.05"),
    ("graphite-interval", "GRAPHITE_INTERVAL_SEC", "0.00001", "at least 0.05 s", "0.05"),
    ("request-timeout", "REQUEST_TIMEOUT_SEC", "1e-9", "at least 1 s", "1"),
    ("score-forceclose-sec", "SSE_SCORE_FORCECLOSE_SEC", "0.01", "at least 1 s", "1"),
    ("detail-forceclose-sec", "SSE_DETAIL_FORCECLOSE_SEC", "0.01", "at least 1 s", "1"),
    ("replay-sec", "SSE_REPLAY_SEC", "0.001", "at least 1 s", "1"),
    ("node", "NODE_NAME", "web.1\nforged line", "not a node name", "web.1"),
    ("admin-token", "ADMIN_TOKEN", "", "empty", "x" * 16),
    ("demo-rate", None, "1e9", "at most 10000", "10000"),
]


@pytest.mark.parametrize(("option", "variable", "bad", "why", "bound"), BOUNDS)
def test_settings_out_of_bounds_are_one_line_errors(option, variable, bad, why, bound):
    key = next(spec.key for spec in SPECS if spec.option == option)
    with pytest.raises(SystemExit) as info:
        options([f"--{option}", bad])
    assert f"--{option}: " in str(info.value) and why in str(info.value)
    assert "\n" not in str(info.value)
    if variable is not None:
        with pytest.raises(ConfigError) as error:
            resolve({variable: bad}, {})
        assert str(error.value).startswith(f"{variable}: ") and why in str(error.value)
        assert "\n" not in str(error.value)
        assert getattr(resolve({variable: bound}, {}), key) is not None
    assert getattr(resolve({}, {key: bound}), key) is not None


@pytest.mark.parametrize("name", [
    "web.1", "run.1234", "ip-10-0-1-7.eu-west-1.compute.internal", "host_a-3",
    "x" * 128])
def test_node_names_hosts_and_dynos_use(name):
    assert resolve({"NODE_NAME": name}, {}).node == name
    assert resolve({"DYNO": name}, {}).node == name


@pytest.mark.parametrize("name", ["", " web", "web 1", "-web", ".web", "x" * 129, "wéb",
                                  "a\rb", "a/b"])
def test_node_names_that_would_break_a_line_or_a_key_are_refused(name):
    with pytest.raises(ConfigError, match=r"^NODE_NAME: .*not a node name"):
        resolve({"NODE_NAME": name, "DYNO": "web.1"}, {})


def test_an_empty_dyno_falls_back_to_the_host_name():
    assert resolve({"DYNO": ""}, {}).node == socket.gethostname()


def test_no_admin_token_is_the_default_and_an_empty_one_an_error():
    assert resolve({}, {}).admin_token == ""
    with pytest.raises(ConfigError, match=r"^ADMIN_TOKEN: the token is empty"):
        resolve({"ADMIN_TOKEN": ""}, {})
    with pytest.raises(ConfigError, match=r"^ADMIN_TOKEN: the token is empty"):
        resolve({"ADMIN_TOKEN": "   "}, {})


@pytest.mark.parametrize(("text", "why"), [
    ("systemd:index=0", "it needs domain="),
    ("tcp:abc", "'abc' is not a number"),
])
def test_an_endpoint_error_says_what_is_wrong_not_the_parsers_python(text, why):
    with pytest.raises(ConfigError) as refused:
        resolve({}, {"listen": text})
    message = str(refused.value)
    assert message.endswith(why), message
    assert "_parse" not in message and "invalid literal" not in message
