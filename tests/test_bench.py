"""The shipped benchmark runs: its --quick smoke run finishes with a complete report
and nothing lost (its speed is the benchmark's business, not a test's)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import repo_env


def test_quick_benchmark_reports_everything_and_loses_nothing(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "-m", "emojistream.bench", "--quick", "--json", str(out)],
        capture_output=True, text=True, env=repo_env(), cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "server CPU µs per message" in result.stdout
    report = json.loads(out.read_text())
    assert report["connected"] == report["workload"]["clients"] == 200
    for kind in ("eps", "raw", "details"):
        assert report["delivered_per_s"][kind] > 0
    assert report["server_us_per_message"] > 0 and report["client_us_per_message"] > 0
    assert report["server_rss_mb"]["idle"] > 0 and report["rss_kb_per_connection"] is not None
    assert set(report["detail_latency_ms"]) == {"p50", "p99", "max"}
    assert report["detail_latency_ms"]["p50"] is not None
    assert report["eps_sums_exact"] is True and report["eps_clients_checked"] > 0
    assert report["loss"] == {"details": 0, "raw": 0}
    assert report["duplicates"] == 0 and report["reordered"] == 0
    assert report["hits_published"] > 0
    assert report["server_dropped_connections"] == 0
