"""``edgenode bench``: it runs and reports its figures (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgenode.bench import framing_efficiency


def test_framing_efficiency_meets_the_target_at_200_bytes() -> None:
    figures = framing_efficiency()
    assert {size: fig["wire_bytes"] for size, fig in figures.items()} == {16: 25, 64: 73, 200: 209}
    assert figures[200]["efficiency"] >= 0.95


@pytest.mark.timeout(120)
def test_bench_reports_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgenode", "bench", "--runs", "2", "--messages", "50", "--json"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rate = report["serial_pty_rate"]
    assert rate["runs"] == 2 and rate["messages"] == 50
    assert 0 < rate["min_msgs_per_s"] <= rate["median_msgs_per_s"] <= rate["max_msgs_per_s"]
    assert report["serial_framing_efficiency"]["200"]["efficiency"] >= 0.95


TLS_FIGURES = ("throughput_64", "throughput_1024", "rtt_p50", "rtt_p99", "startup_s", "idle_rss_mb")


@pytest.mark.timeout(180)
def test_bench_quick_reports_every_node_figure_with_its_reference() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgenode.bench", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["quick"] is True
    figures = report["tls"]["figures"]
    assert set(figures) == set(TLS_FIGURES)
    for name in TLS_FIGURES:
        fig = figures[name]
        assert {"median", "min", "max", "reference", "ratio", "runs", "unit"} <= set(fig), name
        assert 0 < fig["min"] <= fig["median"] <= fig["max"], name
        assert fig["reference"] > 0 and fig["ratio"] > 0, name
    for name in ("throughput_64", "throughput_1024", "rtt_p50", "startup_s", "idle_rss_mb"):
        assert isinstance(figures[name]["target_met"], bool), name
