"""``edgenode bench --only uplink`` reports both sides with their spread."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import need


@pytest.mark.timeout(120)
def test_bench_only_uplink_reports_the_uplink_and_its_reference() -> None:
    need("mosquitto", "mosquitto")
    argv = ["-m", "edgenode", "bench", "--only", "uplink", "--quick", "--runs", "1", "--json"]
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"uplink", "machine"} and "tls" not in report
    figures = report["uplink"]
    assert (figures["runs"], figures["messages"], figures["singles"]) == (1, 500, 50)
    for side in ("uplink", "reference"):
        for name in ("msgs_per_s", "latency_p50_ms", "latency_p99_ms"):
            spread = figures[side][name]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (side, name)
    assert figures["rate_ratio"] > 0
