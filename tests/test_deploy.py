"""Tests of deploy/edgenode.service: the hardened systemd unit."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "edgenode.service"
SYSTEMD_DOC = ROOT / "docs" / "systemd.md"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each key with all its values in order.

    configparser cannot read units: a key may repeat (DeviceAllow=), and an
    empty assignment resets a list (CapabilityBoundingSet=).
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: keep settings on one line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {number}: setting outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: expected key=value, got {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values is not None, f"[{section}] {key}= missing"
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times: {values}"
    return values[0]


def test_unit_runs_the_node_as_its_own_user(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Service", "User") == "edgenode"
    assert one(unit, "Service", "Group") == "edgenode"
    assert one(unit, "Service", "DynamicUser") == "no"
    assert one(unit, "Service", "SupplementaryGroups") == "dialout"
    assert one(unit, "Service", "StateDirectory") == "edgenode"
    assert one(unit, "Service", "StateDirectoryMode") == "0700"
    assert one(unit, "Service", "ExecStart") == (
        "/opt/edgenode/venv/bin/edgenode run --state-dir /var/lib/edgenode "
        "--config /etc/edgenode/edgenode.toml"
    )


def test_unit_stops_gracefully_and_restarts_on_failure(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "RestartSec") == "2"
    # A usage or config error (exit 2) would fail again: not retried.
    assert one(unit, "Service", "RestartPreventExitStatus") == "2"
    # Anything else is retried for ever: a board has nobody at its console.
    assert one(unit, "Unit", "StartLimitIntervalSec") == "0"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    # The node says bye within shutdown_grace_s (2 s); 10 s leaves room.
    assert one(unit, "Service", "TimeoutStopSec") == "10"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_unit_tells_systemd_when_the_node_is_ready_and_feeds_its_watchdog(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    # READY=1 once the node listens, STATUS=, STOPPING=1 (edgenode.systemd).
    assert one(unit, "Service", "Type") == "notify"
    # Only the node's own process may notify: not a keygen child it starts.
    assert one(unit, "Service", "NotifyAccess") == "main"
    # A watchdog restart is a failure: Restart=on-failure restarts it.
    assert one(unit, "Service", "Restart") == "on-failure"
    assert "WatchdogSignal" not in unit["Service"]  # SIGABRT: faulthandler prints the stack


def test_watchdog_is_the_longest_keepalive_timeout_of_the_board_profiles(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    """Never sooner than a peer on any board gives the node up; no later."""
    from edgenode.profiles import list_profiles

    timeouts = [p.apply().keepalive_timeout_s for p in list_profiles() if p.is_node]
    assert timeouts
    assert float(one(unit, "Service", "WatchdogSec")) == max(timeouts)


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "PrivateDevices": "no",
    "DevicePolicy": "closed",
    "CapabilityBoundingSet": "",
}


@pytest.mark.parametrize("key", list(HARDENING))
def test_unit_is_hardened(unit: dict[str, dict[str, list[str]]], key: str) -> None:
    assert one(unit, "Service", key) == HARDENING[key]


def test_unit_allows_only_the_serial_devices(unit: dict[str, dict[str, list[str]]]) -> None:
    allowed = unit["Service"]["DeviceAllow"]
    for group in ("ttyS", "ttyUSB", "ttyACM", "ttyAMA"):
        assert f"char-{group} rw" in allowed
    assert all(a.startswith("char-tty") and a.endswith(" rw") for a in allowed)


def test_unit_leaves_the_memory_limit_to_the_board(unit: dict[str, dict[str, list[str]]]) -> None:
    assert "MemoryMax" not in unit["Service"]
    assert "#MemoryMax=" in UNIT.read_text()


def systemd_verify(text: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit ``text``, without a word."""
    # verify checks that ExecStart's binary exists: point it at one that does.
    true = shutil.which("true")
    assert true is not None
    copy = tmp_path / "edgenode.service"
    copy.write_text(text.replace("/opt/edgenode/venv/bin/edgenode", true))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # verify exits 0 even for unknown keys and bad values; it reports them on stderr.
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)


@needs_systemd
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    systemd_verify(UNIT.read_text(), tmp_path)


@needs_systemd
def test_systemd_accepts_the_unit_with_the_drop_ins_docs_systemd_shows(tmp_path: Path) -> None:
    blocks = re.findall(r"```ini\n(.*?)```", SYSTEMD_DOC.read_text(), re.DOTALL)
    assert blocks
    for number, block in enumerate(blocks):
        assert block.startswith("[Service]\n"), block
        # A drop-in's [Service] lines come after the unit's: appended, as systemd reads them.
        where = tmp_path / str(number)
        where.mkdir()
        systemd_verify(UNIT.read_text() + block, where)
