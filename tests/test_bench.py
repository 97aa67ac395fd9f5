"""``edgenode bench``: it runs and reports its figures (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from edgenode.bench_fleet import slope
from edgenode.bench_serial import framing_efficiency
from edgenode.config import NodeConfig
from edgenode.loadgen import LoadGen, load_identities
from edgenode.node import Node

from .conftest import Identities, wait_until


def test_framing_efficiency_meets_the_target_at_200_bytes() -> None:
    figures = framing_efficiency()
    assert {size: fig["wire_bytes"] for size, fig in figures.items()} == {16: 25, 64: 73, 200: 209}
    assert figures[200]["efficiency"] >= 0.95


def test_slope_is_the_least_squares_fit() -> None:
    assert slope([0, 50, 100, 150, 200], [100, 150, 200, 250, 300]) == 1.0
    assert slope([0, 1, 2], [0, 3, 0]) == 0.0
    assert slope([0, 1, 2, 3], [0, 1, 1, 4]) == pytest.approx(1.2)


TLS_FIGURES = (
    "throughput_64",
    "throughput_1024",
    "send_many_64",
    "rtt_p50",
    "rtt_p99",
    "startup_s",
    "idle_rss_mb",
)
FLEET_FIGURES = (
    "rss_per_peer_kb",
    "idle_cpu_pct_answering",
    "wakeups_per_s_answering",
    "idle_cpu_pct_pinging",
    "wakeups_per_s_pinging",
    "detect_kill_s",
    "detect_stop_s",
)


def _check_tls(tls: dict[str, Any]) -> None:
    figures = tls["figures"]
    assert set(figures) == set(TLS_FIGURES)
    for name in TLS_FIGURES:
        fig = figures[name]
        assert {"median", "min", "max", "reference", "ratio", "runs", "unit"} <= set(fig), name
        assert 0 < fig["min"] <= fig["median"] <= fig["max"], name
        assert fig["reference"] > 0 and fig["ratio"] > 0, name
    for name in TLS_FIGURES:
        assert isinstance(figures[name]["target_met"], bool), name
    # The sender used send() as the README shows, at default settings, and
    # the receiver a default subscription: nothing may be lost.
    assert tls["node_lost"] == 0


def _check_fleet(fleet: dict[str, Any], peers: int) -> None:
    figures = fleet["figures"]
    assert set(figures) == set(FLEET_FIGURES)
    for name in FLEET_FIGURES:
        fig = figures[name]
        assert {"median", "min", "max", "runs", "unit", "target", "over_by"} <= set(fig), name
        assert fig["min"] <= fig["median"] <= fig["max"], name
        assert len(fig["values"]) == fig["runs"] >= 1, name
    # A quick run's idle windows are shorter than the 5 s keepalive interval:
    # their figures are reported, not judged.
    assert fleet["idle_representative"] is False
    for name in ("rss_per_peer_kb", "detect_kill_s", "detect_stop_s"):
        assert isinstance(figures[name]["target_met"], bool), name
    for name in FLEET_FIGURES[1:5]:
        assert figures[name]["target_met"] is None, name
    assert fleet["keepalive"] == {"interval_s": 5.0, "timeout_s": 15.0, "jitter": 0.1}
    for run in fleet["memory_runs"]:
        assert [p for p, _ in run["points"]] == [round(peers * i / 4) for i in range(5)]
        assert all(rss > 0 for _, rss in run["points"])
    assert fleet["idle"]["loadgen"]["up"] == peers
    # Seen by the observer's PeerDown event, not by a poll; a stopped peer
    # can only be noticed by the keepalive.
    assert figures["detect_kill_s"]["min"] > 0 and figures["detect_stop_s"]["min"] > 0
    assert all("keepalive timeout" in r for r in fleet["detect_reasons"]["stop"])


def _check_serial(serial: dict[str, Any], *, runs: int, messages: int) -> None:
    """The serial section: reliable and unreliable mode each way, beside the reference."""
    assert (serial["runs"], serial["messages"]) == (runs, messages)
    assert serial["framing_efficiency"]["200"]["efficiency"] >= 0.95
    rates = serial["rates"]
    for mode in ("reliable", "unreliable", "reference"):
        for way in ("device_to_node", "node_to_device"):
            fig = rates[mode][way]
            assert 0 < fig["min"] <= fig["median"] <= fig["max"], (mode, way)
    assert rates["reliable"]["device_to_node_lost"] == 0  # reliable mode loses nothing
    assert rates["unreliable"]["device_to_node_lost"] >= 0


@pytest.mark.timeout(120)
def test_bench_quick_reports_every_figure() -> None:
    argv = ["edgenode", "bench", "--quick", "--runs", "2", "--messages", "50", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=110
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["quick"] is True
    _check_serial(report["serial"], runs=2, messages=50)
    _check_tls(report["tls"])
    _check_fleet(report["fleet"], peers=20)


@pytest.mark.timeout(60)
def test_bench_runs_only_the_sections_asked_for() -> None:
    argv = ["edgenode.bench", "--only", "serial", "--runs", "1", "--messages", "20", "--json"]
    result = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    _check_serial(report["serial"], runs=1, messages=20)
    assert "tls" not in report and "fleet" not in report
    result = subprocess.run(
        [sys.executable, "-m", "edgenode.bench", "--only", "fleet", "--peers", "2"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 2 and "--peers: expected 4..5000" in result.stderr


@pytest.mark.timeout(30)
def test_loadgen_peers_ping_the_node_and_get_its_pongs(
    identities: Identities, tmp_path: Path
) -> None:
    peers = load_identities(tmp_path / "ids", 3)

    async def main() -> None:
        config = NodeConfig(
            state_dir=identities["a"].state_dir,
            listen_host="127.0.0.2",
            listen_port=0,
            authorised=frozenset(p.node_id for p in peers),
            remember_peers=False,
        )
        async with Node(config) as node:
            async with LoadGen(peers, "127.0.0.2", node.listen_port, node_id=node.node_id) as gen:
                assert await gen.connect(3) == 3
                assert gen.ping_every(0.05, jitter=0.1) == 3
                assert gen.ping_every(0.05) == 0  # already pinging
                await wait_until(lambda: all(p.pongs >= 2 for p in gen.peers), timeout=10)
                assert gen.up == 3 and node.stats()["peers_up"] == 3
                assert all(p.pings_sent >= p.pongs for p in gen.peers)

    anyio.run(main)


def test_the_table_says_by_how_much_a_target_is_missed_and_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgenode.bench import _print_tls_table

    def fig(median: float, reference: float, target: str, met: bool, unit: str) -> dict[str, Any]:
        return {"median": median, "min": median, "max": median, "reference": reference,
                "ratio": median / reference, "unit": unit, "target": target,
                "target_met": met}  # fmt: skip

    figures = {
        "rtt_p50": fig(0.308, 0.174, "ratio <= 1.5", False, "ms"),
        "rtt_p99": fig(0.3, 0.2, "ratio <= 2", True, "ms"),
    }
    _print_tls_table({"plan": {"runs": 5}, "figures": figures, "node_lost": 0})
    lines = capsys.readouterr().out.splitlines()
    [p50] = [line for line in lines if line.startswith("  rtt_p50 ")]
    assert p50.endswith("1.77x  ratio <= 1.5: MISSED by 0.27x")
    [p99] = [line for line in lines if line.startswith("  rtt_p99 ")]
    assert p99.endswith("ratio <= 2: met")
    assert "  - rtt_p50: a request has two task switches" in "\n".join(lines)
    assert not any(line.startswith("  - rtt_p99") for line in lines)
