"""The [uplink] section of the configuration file, its flags and --print-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgenode.errors import ConfigError
from edgenode.settings import load_config_file, resolve
from edgenode.uplink.config import InMap, OutMap

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _state_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGENODE_STATE_DIR", str(tmp_path / "state"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgenode.toml"
    path.write_text(text)
    return path


def password(tmp_path: Path, text: str = "s3cret\n", mode: int = 0o600) -> Path:
    path = tmp_path / "mqtt.password"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_section_builds_an_uplink_config(tmp_path: Path) -> None:
    password(tmp_path)
    path = write(
        tmp_path,
        """
        [uplink]
        broker = "mqtts://broker.example"
        username = "site-a"
        password_file = "mqtt.password"
        queue_policy = "refuse-new"
        [[uplink.out]]
        topic = "sensors/#"
        [[uplink.in]]
        topic = "{prefix}/cmd/#"
        deliver = "device:esp1"
        qos = 0
        """,
    )
    uplink = resolve(config_file=path).config.uplink
    assert uplink.broker == "mqtts://broker.example"
    assert (uplink.username, uplink.password) == ("site-a", "s3cret")
    assert uplink.password_file == tmp_path / "mqtt.password"
    assert uplink.outbound == (OutMap("sensors/#"),)
    assert uplink.inbound == (InMap("{prefix}/cmd/#", deliver="device:esp1", qos=0),)
    assert uplink.queue_policy == "refuse-new"
    assert (uplink.queue_messages, uplink.queue_bytes) == (None, None)  # derived by the node


def test_no_uplink_without_a_broker() -> None:
    assert resolve().config.uplink is None


def test_other_uplink_keys_without_a_broker_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[uplink]\nqueue_policy = 'refuse-new'\n")
    with pytest.raises(ConfigError) as info:
        resolve(config_file=path)
    assert str(info.value) == (
        "uplink.broker: expected a broker URL with the other [uplink] settings "
        f"(uplink.queue_policy from file {path})"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "broker = 'http://x'",
            "uplink.broker: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got 'http://x'",
        ),
        ("broker = 'mqtt://x'\nprotocol = 5", 'uplink.protocol: expected "3.1.1" or "5", got 5'),
        (
            "broker = 'mqtt://x'\nqueue_policy = 'drop'",
            'uplink.queue_policy: expected "drop-oldest" or "refuse-new", got \'drop\'',
        ),
        (
            "broker = 'mqtt://x'\nkeepalive_s = 1",
            "uplink.keepalive_s: expected an integer in 5..65535, got 1",
        ),
        (
            "broker = 'mqtt://x'\nprefix = 'a/+'",
            "uplink.prefix: uplink.prefix: expected a topic name without '+', got 'a/+'",
        ),
        (
            "broker = 'mqtt://x'\nout = {topic = 'a'}",
            "uplink.out: expected a list of tables ([[uplink.out]] entries), got a table",
        ),
        (
            "broker = 'mqtt://x'\n[[uplink.out]]\ntopic = 'a'\n"
            "[[uplink.out]]\ntopic = 'b'\nqos = 2",
            "uplink.out: entry 2: qos: expected 0 or 1 (MQTT QoS 2 is not offered), got 2",
        ),
        (
            "broker = 'mqtt://x'\n[[uplink.in]]\ntopic = 'a'\ndelivery = 'site'",
            "uplink.in: entry 1: delivery: unknown key; "
            "[[uplink.in]] takes topic, to, deliver, qos",
        ),
        ("broker = 'mqtt://x'\n[[uplink.in]]\nto = 'a'", "uplink.in: entry 1: topic: missing"),
        ("brokers = 'mqtt://x'", "uplink.brokers: unknown key; did you mean uplink.broker?"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "[uplink]\n" + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == f"{path}: {message}"


def test_a_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    secret = password(tmp_path, mode=0o644)
    path = write(tmp_path, "[uplink]\nbroker = 'mqtt://x'\npassword_file = 'mqtt.password'\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == (
        f"{path}: uplink.password_file: {secret} is readable by others (mode 0644); "
        f"run: chmod 600 {secret}"
    )


def test_cross_field_checks_run_when_the_layers_are_merged(tmp_path: Path) -> None:
    path = write(tmp_path, "[uplink]\nbroker = 'mqtt://x'\nca_file = 'ca.pem'\n")
    with pytest.raises(ConfigError) as info:
        resolve(config_file=path)
    assert str(info.value) == "uplink.ca_file: only used with an mqtts:// broker, got 'mqtt://x'"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgenode", "run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_print_config_shows_the_uplink_and_its_derived_caps_without_loading_paho(
    tmp_path: Path,
) -> None:
    secret = password(tmp_path)
    config = write(tmp_path, "[uplink]\nusername = 'site-a'\n")
    code = (
        "import sys\n"
        "from edgenode.cli import main\n"
        f"status = main(['run', '--board', 'pi-zero-w', '--config', {str(config)!r},\n"
        f"    '--uplink', 'mqtt://127.0.0.1:1883', '--uplink-password-file', {str(secret)!r},\n"
        "    '--print-config'])\n"
        "print('paho loaded:', 'paho' in sys.modules)\n"
        "sys.exit(status)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "paho loaded: False"
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert lines["uplink.broker"].split()[1:] == ["mqtt://127.0.0.1:1883", "command", "line"]
    assert "(password hidden)" in lines["uplink.password_file"] and "s3cret" not in result.stdout
    assert lines["uplink.queue_bytes"].split()[1:] == [
        "5242880",
        "board",
        "pi-zero-w",
        "(1/8",
        "of",
        "node.memory_budget_mb)",
    ]


def test_a_bad_uplink_flag_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run_cli("--uplink", "broker:1883", "--print-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --uplink: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got 'broker:1883'"
    )


def test_the_fleet_docs_example_is_a_valid_configuration(tmp_path: Path) -> None:
    import re

    doc = (ROOT / "docs" / "fleet.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert example
    secret = password(tmp_path)
    text = example.group(1).replace("/etc/edgenode/mqtt.password", str(secret))
    resolved = resolve(config_file=write(tmp_path, text))
    uplink = resolved.config.uplink
    assert uplink.outbound == (OutMap("sensors/#", qos=1),)
    assert uplink.inbound == (InMap("fleet/site-a/commands/#", to="commands/#", deliver="site"),)
