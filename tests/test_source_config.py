"""--source and --stream-key: read like every setting (option over environment, one-line
errors), streams imply event IDs and lift the --workers warning, and the daemon built
with them reads the stream (fast tier: built, not started)."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from emojistream.config import ConfigError, resolve
from emojistream.redisfeed import RedisFeed
from emojistream.service import Emojistream
from emojistream.streamfeed import StreamFeed
from emojistream.streamhistory import RedisHistory
from emojistream.tap import Options


def options(argv: list[str], env: dict[str, str] | None = None) -> Options:
    opts = Options(environ=env or {})
    opts.parseOptions(argv)
    return opts


def test_the_source_is_pubsub_unless_told_and_the_option_wins():
    assert resolve({}, {}).source == "pubsub"
    assert resolve({"EMOJISTREAM_SOURCE": "Streams"}, {}).source == "streams"
    assert resolve({"EMOJISTREAM_SOURCE": "streams"}, {"source": "pubsub"}).source == "pubsub"
    settings = options(["--source", "streams", "--stream-key", "{es}:events"]).settings
    assert settings is not None and settings.stream_key == "{es}:events"
    assert resolve({}, {}).stream_key == "emojistream:events"
    assert resolve({"EMOJISTREAM_STREAM_KEY": "x:y"}, {}).stream_key == "x:y"


@pytest.mark.parametrize(("option", "variable", "bad", "why"), [
    ("source", "EMOJISTREAM_SOURCE", "kafka", "not a source (pubsub or streams)"),
    ("stream-key", "EMOJISTREAM_STREAM_KEY", "a key\nwith a newline", "not a stream key"),
])
def test_a_bad_source_or_key_is_one_line(option, variable, bad, why):
    with pytest.raises(SystemExit) as info:
        options([f"--{option}", bad])
    assert str(info.value).startswith(f"twistd emojistream: --{option}: ")
    assert why in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError) as error:
        resolve({variable: bad}, {})
    assert str(error.value).startswith(f"{variable}: ") and "\n" not in str(error.value)


def test_streams_imply_event_ids_whatever_event_ids_says():
    assert resolve({"EMOJISTREAM_SOURCE": "streams"}, {}).event_ids
    assert resolve({}, {"source": "streams", "event_ids": "false"}).event_ids
    assert not resolve({}, {}).event_ids
    assert "always on with --source streams" in " ".join(str(Options()).split())


def test_streams_with_workers_do_not_warn_that_resumes_need_sticky_routing(logs):
    options(["--workers", "2", "--source", "streams", "--listen", "tcp:8001"])
    options(["--workers", "2", "--source", "streams", "--event-ids", "--listen", "tcp:8001"])
    assert not [line for line in logs.ours() if "sticky routing" in line]
    options(["--workers", "2", "--event-ids", "--listen", "tcp:8001"])
    assert [line for line in logs.ours() if "sticky routing" in line]


def test_a_daemon_with_streams_reads_the_stream_with_positions_and_a_history():
    app = Emojistream(resolve({"NODE_NAME": "n"}, {"source": "streams",
                                                   "stream_key": "k:events"}),
                      MemoryReactorClock())
    assert isinstance(app.feed, StreamFeed) and app.feed.stream_key == "k:events"
    assert app.journal is not None and app.journal.positions
    assert isinstance(app.history, RedisHistory)
    assert app.redis.state == app.feed.state == "connecting"
    document = app.status.document(connections=False)
    assert document["source"] == "streams" and document["stream"]["key"] == "k:events"
    assert document["replays"] == {"memory": 0, "redis": 0, "gaps": {
        "expired": 0, "invalid": 0, "replaced": 0, "unavailable": 0}, "fetching": 0,
        "fetch_waiting": 0,
        "fetch_busy": 0, "fetch_pages": 0}
    exposition = app.metrics.exposition().decode()
    assert 'emojistream_source{source="streams"} 1.0' in exposition
    assert 'emojistream_stream_gaps_total{reason="replaced"} 0.0' in exposition
    assert "emojistream_replay_fetched_total 0.0" in exposition
    assert "emojistream_replay_fetches_waiting 0.0" in exposition


def test_a_daemon_with_pubsub_is_as_before():
    app = Emojistream(resolve({"NODE_NAME": "n"}, {}), MemoryReactorClock())
    assert isinstance(app.feed, RedisFeed) and app.journal is None and app.history is None
    document = app.status.document(connections=False)
    assert document["source"] == "pubsub" and "stream" not in document
    exposition = app.metrics.exposition().decode()
    assert 'emojistream_source{source="pubsub"} 1.0' in exposition
    assert "emojistream_stream_" not in exposition
