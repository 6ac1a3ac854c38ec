"""The shipped benchmark runs: its --quick smoke run finishes with a complete report
and nothing lost (its speed is the benchmark's business, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, repo_env

BENCH = str(REPO / "benchmarks" / "bench.py")


def test_quick_benchmark_reports_everything_and_loses_nothing(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, BENCH, "--quick", "--after", "2",
         "--json", str(out)],
        capture_output=True, text=True, env=repo_env(), cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "server CPU µs per message" in result.stdout
    report = json.loads(out.read_text())
    assert report["connected"] == report["workload"]["clients"] == 200
    for kind in ("eps", "raw", "details"):
        assert report["delivered_per_s"][kind] > 0
    assert report["server_us_per_message"] > 0 and report["client_us_per_message"] > 0
    user, system = report["server_us_per_message_user_system"]
    assert user >= 0 and system >= 0 and report["steal_cpu_percent"] >= 0
    assert report["server_rss_mb"]["idle"] > 0 and report["rss_kb_per_connection"] is not None
    assert set(report["detail_latency_ms"]) == {"p50", "p99", "max"}
    assert report["detail_latency_ms"]["p50"] is not None
    # /raw latency: of the sampled raw streams' messages, from each hit's publish time.
    assert report["raw_latency_samples"] > 0
    assert 0 < report["raw_latency_ms"]["p50"] <= report["raw_latency_ms"]["p99"]
    assert report["eps_sums_exact"] is True and report["eps_clients_checked"] > 0
    assert report["loss"] == {"details": 0, "raw": 0}
    assert report["duplicates"] == 0 and report["reordered"] == 0
    assert report["hits_published"] > 0
    assert report["server_dropped_connections"] == 0
    # The recovery phase after the window: latency by half second of publish time.
    after = report["after_window"]
    assert after["seconds"] == 2 and len(after["p99_ms_per_half_second"]) == 4
    assert after["p99_ms_from_2s"] is None or after["p99_ms_from_2s"] > 0



def test_quick_benchmark_with_the_stream_source_loses_nothing_and_reports_redis(tmp_path):
    """--source streams: the daemon reads the stream the publisher appends to; the
    clients' checks hold although every event now carries an id: line."""
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, BENCH, "--quick", "--source", "streams", "--json", str(out)],
        capture_output=True, text=True, env=repo_env(), cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Redis CPU µs per hit published" in result.stdout
    report = json.loads(out.read_text())
    assert report["source"] == "streams"
    assert report["workload"]["server_args"] == []
    for kind in ("eps", "raw", "details"):
        assert report["delivered_per_s"][kind] > 0
    assert report["detail_latency_ms"]["p50"] is not None
    assert report["eps_sums_exact"] is True and report["eps_clients_checked"] > 0
    assert report["loss"] == {"details": 0, "raw": 0}
    assert report["duplicates"] == 0 and report["reordered"] == 0
    assert report["server_dropped_connections"] == 0
    assert report["redis_us_per_hit"] is not None and report["redis_us_per_hit"] >= 0
    # The reader's reads over the window, each bringing one entry at least.
    assert report["stream_reads_per_s"] > 0 and report["stream_entries_per_read"] >= 1


def test_the_stream_memory_benchmark_measures_the_history_it_appended():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "stream_memory.py"), "--hits", "3000"],
        capture_output=True, text=True, env=repo_env(), timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = {line[:30].strip(): line[30:].strip() for line in result.stdout.splitlines()}
    assert figures["hits appended"] == "3000 (6000 entries)"
    per_entry = float(figures["bytes per entry"])
    # Each entry holds its channel and payload at least.
    payload_per_hit = float(figures["payload bytes per hit"].split()[0])
    assert per_entry * 2 > payload_per_hit > 0
    # The stream holds every payload it was given, whatever else it costs.
    assert int(figures["MEMORY USAGE of the stream"].split()[0]) > 3000 * payload_per_hit

def test_send_floor_reports_the_cost_of_a_bare_send_with_and_without_nodelay(tmp_path):
    out = tmp_path / "floor.json"
    result = subprocess.run(
        [sys.executable, BENCH, "--send-floor", "--clients", "40",
         "--window", "1", "--floor-rate", "4000", "--json", str(out)],
        capture_output=True, text=True, env=repo_env(), cwd=tmp_path, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert len(report) == 2
    for figures in report.values():
        assert figures["sends"] > 1000
        assert figures["user_us"] + figures["system_us"] > 0


def test_the_broadcast_micro_benchmark_prints_its_figures():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "broadcast.py"), "--streams", "50",
         "--messages", "50", "--repeats", "2"],
        capture_output=True, text=True, env=repo_env(), timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("50 streams, 50 messages")
    names = ("detail broadcast", "score summary", "20 per Redis read", "one stream per ID",
             "7 per tick, held")
    for name, line in zip(names, lines[1:], strict=True):
        assert line.split()[:len(name.split())] == name.split()
        assert float(line.split()[len(name.split())]) > 0
