"""Settings from environment and options, and the twistd Options around them."""

from __future__ import annotations

import pytest
from twisted.python import usage

from emojistream.config import ConfigError, RedisAddress, parse_bool, parse_redis_url, resolve
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
