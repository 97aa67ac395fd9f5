"""The configuration file and the four layers: defaults < board < file < command line.

Every bad value, key, section or file has a test that checks the error's
type and its whole message. ``--print-config`` runs as a real subprocess.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgenode.config import NodeConfig, SerialPortSpec
from edgenode.errors import ConfigError, InvalidNodeId
from edgenode.settings import (
    BY_KEY,
    SETTINGS,
    load_config_file,
    resolve,
)

ROOT = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT_S = 30.0
NODE_ID = "mmg4-2klg-yqzw-neis-krel-xms3-qjpg"  # the protocol document's example


@pytest.fixture(autouse=True)
def _state_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Never the user's own state directory."""
    state = tmp_path / "env-state"
    monkeypatch.setenv("EDGENODE_STATE_DIR", str(state))
    return state


def write(tmp_path: Path, text: str, name: str = "edgenode.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def key_file(tmp_path: Path, key: bytes = b"k" * 32, mode: int = 0o600) -> Path:
    path = tmp_path / "uart.key"
    path.write_bytes(key)
    path.chmod(mode)
    return path


# -- the keys -------------------------------------------------------------------------


def test_every_nodeconfig_field_has_a_key() -> None:
    fields = {f.name for f in dataclasses.fields(NodeConfig)}
    # The [uplink] section's keys build NodeConfig.uplink together.
    covered = {s.field for s in SETTINGS if s.field} | {"listen_host", "listen_port", "uplink"}
    assert covered == fields, f"no config file key for {sorted(fields - covered)}"


def test_documented_example_sets_every_key(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    # The longest of the page's TOML examples is the one that sets every key.
    example = max(re.finditer(r"```toml\n(.*?)```", doc, re.S), key=lambda m: len(m.group(1)))
    text = example.group(1).replace("/etc/edgenode/uart.key", str(key_file(tmp_path)))
    password = tmp_path / "mqtt.password"
    password.write_text("secret\n")
    password.chmod(0o600)
    text = text.replace("/etc/edgenode/mqtt.password", str(password))
    values = load_config_file(write(tmp_path, text))
    assert set(values) == set(BY_KEY)


# -- the layers -----------------------------------------------------------------------


def test_defaults_alone_are_nodeconfig_defaults(_state_dir_env: Path) -> None:
    resolved = resolve()
    assert resolved.config == NodeConfig(state_dir=_state_dir_env)
    assert resolved.board is None
    assert resolved.sources["node.state_dir"] == "environment EDGENODE_STATE_DIR"
    assert {s for k, s in resolved.sources.items() if k != "node.state_dir"} == {"default"}


def test_default_state_dir_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGENODE_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", "/x/state")
    resolved = resolve()
    assert resolved.config.state_dir == Path("/x/state/edgenode")
    assert resolved.sources["node.state_dir"] == "default"


def test_precedence_across_all_four_layers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [node]
        board = "pi-5"              # overridden by --board
        [peers]
        max = 20                    # overrides the board's 32
        prune_after_s = 600
        [keepalive]
        interval_s = 8
        timeout_s = 40
        [limits]
        outbox_frames = 24
        """,
    )
    resolved = resolve(
        board="pi-zero-w",
        config_file=path,
        command_line={"peers.max": 10, "keepalive.timeout_s": 33.0},
    )
    config, sources = resolved.config, resolved.sources
    file = f"file {path}"
    expected = {
        # key: (NodeConfig field, value, source)
        "node.board": (None, "pi-zero-w", "command line"),
        "peers.max": ("max_peers", 10, "command line"),
        "keepalive.timeout_s": ("keepalive_timeout_s", 33.0, "command line"),
        "keepalive.interval_s": ("keepalive_interval_s", 8.0, file),
        "peers.prune_after_s": ("prune_after_s", 600.0, file),
        "limits.outbox_frames": ("outbox_frames", 24, file),
        "limits.inbox_size": ("inbox_size", 128, "board pi-zero-w"),
        "backoff.cap_s": ("backoff_cap_s", 60.0, "board pi-zero-w"),
        "node.memory_budget_mb": ("memory_budget_mb", 40, "board pi-zero-w"),
        "limits.subscription_buffer": ("subscription_buffer", 256, "default"),
        "keepalive.jitter": ("keepalive_jitter", 0.1, "default"),
    }
    for key, (field, value, source) in expected.items():
        assert sources[key] == source, key
        assert resolved.values[key] == value, key
        if field:
            assert getattr(config, field) == value, key
    assert resolved.board is not None and resolved.board.name == "pi-zero-w"
    # The table shows the same.
    rows = {key: (value, source) for key, value, source in resolved.rows()}
    assert rows["peers.max"] == ("10", "command line")
    assert rows["keepalive.interval_s"] == ("8", file)
    assert rows["limits.inbox_size"] == ("128", "board pi-zero-w")
    assert rows["limits.subscription_buffer"] == ("256", "default")
    assert [row[0] for row in resolved.rows()] == [s.key for s in SETTINGS]


def test_board_named_in_file_applies_below_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nboard = "pi-3b"\n[peers]\nmax = 100\n')
    resolved = resolve(config_file=path)
    assert resolved.sources["node.board"] == f"file {path}"
    assert resolved.config.max_peers == 100
    assert resolved.config.inbox_size == 512
    assert resolved.sources["limits.inbox_size"] == "board pi-3b"


def test_interval_without_timeout_gives_three_intervals(tmp_path: Path) -> None:
    path = write(tmp_path, "[keepalive]\ninterval_s = 20\n[serial]\nkeepalive_interval_s = 2\n")
    resolved = resolve(board="pi-zero-w", config_file=path)
    assert resolved.config.keepalive_timeout_s == 60.0  # not the board's 30
    assert resolved.sources["keepalive.timeout_s"] == f"file {path} (3 x keepalive.interval_s)"
    assert resolved.config.serial_keepalive_timeout_s == 6.0
    cli = resolve(board="pi-zero-w", command_line={"keepalive.interval_s": 2.0})
    assert cli.config.keepalive_timeout_s == 6.0
    assert cli.sources["keepalive.timeout_s"] == "command line (3 x keepalive.interval_s)"


def test_timeout_set_at_a_higher_layer_is_kept() -> None:
    resolved = resolve(board="pi-zero-w", command_line={"keepalive.timeout_s": 45.0})
    assert resolved.config.keepalive_interval_s == 10.0
    assert resolved.config.keepalive_timeout_s == 45.0


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    key_file(conf)
    path = write(conf, '[node]\nstate_dir = "state"\n[serial]\npsk_file = "uart.key"\n')
    resolved = resolve(config_file=path)
    assert resolved.config.state_dir == conf.absolute() / "state"
    assert resolved.config.serial_psk == b"k" * 32
    shown = dict((k, v) for k, v, _ in resolved.rows())["serial.psk_file"]
    assert shown == f"{conf.absolute() / 'uart.key'} (32-byte key)"
    assert "kkkk" not in resolved.format_table()


def test_serial_ports_without_baud_take_the_resolved_baud(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[serial]\nbaud = 57600\nports = ["/dev/ttyUSB0", "/dev/ttyAMA0:9600"]\n'
    )
    resolved = resolve(config_file=path)
    assert resolved.config.serial_ports == [
        SerialPortSpec("/dev/ttyUSB0", 57600),
        SerialPortSpec("/dev/ttyAMA0", 9600),
    ]
    spec = SerialPortSpec("/dev/ttyS0", None, False, None)
    cli = resolve(config_file=path, command_line={"serial.ports": [spec]})
    assert cli.config.serial_ports == [SerialPortSpec("/dev/ttyS0", 57600, False, None)]


def test_file_sets_addresses_and_node_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[node]\nlisten = "[::1]:7400"\n[peers]\nconnect = ["10.0.0.2", "10.0.0.3:7301"]\n'
        f'authorised = ["{NODE_ID.upper()}"]\nlearn = false\n',
    )
    config = resolve(config_file=path).config
    assert (config.listen_host, config.listen_port) == ("::1", 7400)
    assert config.peers == [("10.0.0.2", 7300), ("10.0.0.3", 7301)]
    assert config.authorised == frozenset({NODE_ID})
    assert config.learn_peers is False


def test_command_line_lists_replace_the_files(tmp_path: Path) -> None:
    path = write(tmp_path, '[peers]\nconnect = ["10.0.0.2"]\n')
    resolved = resolve(config_file=path, command_line={"peers.connect": [("10.0.0.9", 7300)]})
    assert resolved.config.peers == [("10.0.0.9", 7300)]


def test_resolve_rejects_unknown_command_line_key() -> None:
    with pytest.raises(ConfigError, match=r"^unknown setting 'peers\.maximum'$"):
        resolve(command_line={"peers.maximum": 3})


def test_resolve_rejects_unknown_board() -> None:
    with pytest.raises(ConfigError, match=r"^unknown board 'banana'; known boards: esp32, "):
        resolve(board="banana")


def test_resolve_rejects_microcontroller_board() -> None:
    with pytest.raises(ConfigError, match=r"^board 'rp2040' is a microcontroller: "):
        resolve(board="rp2040")


# -- bad files --------------------------------------------------------------------------

BAD_VALUES = [
    # wrong type
    ('[keepalive]\ninterval_s = "soon"', "keepalive.interval_s: expected a number > 0, got 'soon'"),
    ("[peers]\nmax = true", "peers.max: expected an integer >= 1, got true"),
    ("[peers]\nmax = 32.5", "peers.max: expected an integer >= 1, got 32.5"),
    ("[peers]\nmax = [32]", "peers.max: expected an integer >= 1, got [32]"),
    ('[serial]\nreliable = "yes"', "serial.reliable: expected true or false, got 'yes'"),
    ("[node]\nstate_dir = 5", "node.state_dir: expected a path, got 5"),
    ("[node]\nlisten = 7300", 'node.listen: expected a "host:port" string, got 7300'),
    (
        '[peers]\nconnect = "10.0.0.1"',
        "peers.connect: expected a list of \"host:port\" strings, got '10.0.0.1'",
    ),
    (
        '[serial]\nports = ["/dev/ttyUSB0", 2]',
        'serial.ports: expected a list of "PORT[:BAUD][,dtr=on|off][,rts=on|off]" strings, '
        "got ['/dev/ttyUSB0', 2]",
    ),
    ("[keepalive]\ninterval_s = 1979-05-27", "keepalive.interval_s: expected a number > 0, got"),
    # out of range
    ("[peers]\nmax = 0", "peers.max: expected an integer >= 1, got 0"),
    ("[keepalive]\ninterval_s = -1", "keepalive.interval_s: expected a number > 0, got -1"),
    ("[keepalive]\ninterval_s = nan", "keepalive.interval_s: expected a number > 0, got nan"),
    ("[keepalive]\ninterval_s = inf", "keepalive.interval_s: expected a number > 0, got inf"),
    ("[keepalive]\njitter = 0.5", "keepalive.jitter: expected a number >= 0 and < 0.5, got 0.5"),
    ("[node]\nshutdown_grace_s = -0.1", "node.shutdown_grace_s: expected a number >= 0, got -0.1"),
    (
        "[node]\nmemory_budget_mb = 8",
        "node.memory_budget_mb: expected an integer in 16..1048576, got 8",
    ),
    (
        "[limits]\nmax_frame_bytes = 100",
        "limits.max_frame_bytes: expected an integer in 256..16777216, got 100",
    ),
    ("[serial]\nmax_frame = 8192", "serial.max_frame: expected an integer in 128..4096, got 8192"),
    ("[serial]\nbaud = 10", "serial.baud: expected an integer in 50..4000000, got 10"),
    (
        '[node]\nlisten = "0.0.0.0:99999"',
        "node.listen: invalid address '0.0.0.0:99999': port should be 0..65535, got '99999'",
    ),
    (
        '[serial]\nports = ["/dev/ttyUSB0:fast"]',
        "serial.ports: serial port '/dev/ttyUSB0:fast': baud rate should be 50..4000000, "
        "got 'fast'",
    ),
    # unknown keys and sections
    (
        "[keepalive]\nintervl_s = 5",
        "keepalive.intervl_s: unknown key; did you mean keepalive.interval_s?",
    ),
    (
        "[keepalive]\nsnooze = 5",
        "keepalive.snooze: unknown key; [keepalive] takes interval_s, jitter, timeout_s",
    ),
    ("[keepalive.extra]\na = 1", "keepalive.extra: unknown key; [keepalive] takes "),
    (
        "[keepalives]\ninterval_s = 5",
        "[keepalives]: unknown section; did you mean [keepalive]? (sections: [node], [peers], "
        "[keepalive], [backoff], [limits], [serial], [discovery], [uplink])",
    ),
    ("[board]\nkind = 'node'", "[board]: unknown section; (sections: [node], "),
    (
        "keepalive_interval_s = 5",
        "keepalive_interval_s: unknown key; did you mean keepalive.interval_s?",
    ),
    (
        "interval_s = 5",
        "interval_s: unknown key; did you mean keepalive.interval_s or discovery.interval_s?",
    ),
    ("colour = 5", "colour: unknown key; keys belong in a section: [node], [peers], "),
    ("keepalive = 5", "keepalive: expected a table [keepalive], got 5"),
    # boards named in the file
    (
        '[node]\nboard = "pi-6"',
        "node.board: unknown board 'pi-6'; did you mean pi-5? known boards: esp32, ",
    ),
    ('[node]\nboard = "esp32"', "node.board: board 'esp32' is a microcontroller: "),
]


@pytest.mark.parametrize(("text", "message"), BAD_VALUES)
def test_config_file_rejects_bad_value(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        resolve(config_file=path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)


def test_config_file_rejects_bad_node_id(tmp_path: Path) -> None:
    path = write(tmp_path, '[peers]\nauthorised = ["aaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa"]\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert not isinstance(info.value, InvalidNodeId)  # re-raised with the file and key
    assert str(info.value).startswith(f"{path}: peers.authorised: ")
    assert "aaaa-aaaa" in str(info.value)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[keepalive]\ninterval_s = \n", "at line 2, column 14"),
        ("[keepalive]\ninterval_s = 1\ninterval_s = 2\n", "at line 3, column "),
        ("[keepalive\n", "at line 1, column 11"),
    ],
)
def test_config_file_rejects_invalid_toml_with_its_line(
    tmp_path: Path, text: str, where: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: "), message
    assert f"({where}" in message, message


def test_config_file_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "edgenode.toml"
    path.write_bytes(b"[node]\n# caf\xe9\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}: invalid TOML: not UTF-8 \(at line 2\)$"
    ):
        load_config_file(path)


def test_config_file_rejects_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        resolve(config_file=path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_config_file_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_file(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read: Is a directory"


def test_config_file_rejects_huge_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r": file exceeds the 1048576-byte limit$"):
        load_config_file(path)


def test_config_file_rejects_psk_readable_by_others(tmp_path: Path) -> None:
    key = key_file(tmp_path, mode=0o644)
    path = write(tmp_path, f'[serial]\npsk_file = "{key}"\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == (
        f"{path}: serial.psk_file: {key} is readable by others (mode 0644); run: chmod 600 {key}"
    )


def test_config_file_rejects_psk_of_wrong_size(tmp_path: Path) -> None:
    key = key_file(tmp_path, key=b"short")
    path = write(tmp_path, f'[serial]\npsk_file = "{key}"\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert (
        str(info.value)
        == f"{path}: serial.psk_file: {key}: expected a key of 16..64 bytes, got 5 bytes"
    )


def test_cross_field_error_names_the_layers_that_set_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[keepalive]\ninterval_s = 10\ntimeout_s = 5\n")
    with pytest.raises(ConfigError) as info:
        resolve(config_file=path)
    assert str(info.value) == (
        "keepalive_timeout_s: expected more than keepalive_interval_s (10.0), got 5.0 "
        f"(keepalive.interval_s from file {path}; keepalive.timeout_s from file {path})"
    )
    with pytest.raises(ConfigError) as info:
        resolve(board="pi-zero-w", command_line={"keepalive.timeout_s": 5.0})
    assert str(info.value) == (
        "keepalive_timeout_s: expected more than keepalive_interval_s (10.0), got 5.0 "
        "(keepalive.interval_s from board pi-zero-w)"
    )
    path = write(tmp_path, "[backoff]\nbase_s = 90\n", "backoff.toml")
    with pytest.raises(ConfigError) as info:
        resolve(board="pi-5", config_file=path)
    assert str(info.value) == (
        "backoff_cap_s: expected at least backoff_base_s (90.0), got 30.0 "
        f"(backoff.base_s from file {path}; backoff.cap_s from board pi-5)"
    )


# -- the command line -------------------------------------------------------------------


def edgenode(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "XDG_STATE_HOME"}
    env["EDGENODE_STATE_DIR"] = str(tmp_path / "default-state")
    return subprocess.run(
        [sys.executable, "-m", "edgenode", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=COMMAND_TIMEOUT_S,
    )


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """``--print-config`` output as ``{key: (value, source)}``, checking its columns line up."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["setting", "value", "source"]
    value_at, source_at = lines[0].index("value"), lines[0].index("source")
    rows = {}
    for line in lines[1:]:
        key = line[:value_at].strip()
        rows[key] = (line[value_at:source_at].strip(), line[source_at:].strip())
    return rows


def test_print_config_shows_each_value_and_its_source(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[node]\nboard = "pi-5"\nstate_dir = "{tmp_path / "state"}"\n'
        '[peers]\nmax = 20\nconnect = ["10.0.0.2"]\n[keepalive]\ninterval_s = 8\n',
    )
    result = edgenode(
        tmp_path,
        "run",
        "--board",
        "pi-zero-w",
        "--config",
        str(path),
        "--peer",
        "10.0.0.7:7301",
        "--keepalive-timeout",
        "50",
        "--serial",
        "/dev/ttyUSB0",
        "--print-config",
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = table(result.stdout)
    assert list(rows) == [s.key for s in SETTINGS]
    file = f"file {path}"
    assert rows["node.board"] == ("pi-zero-w", "command line")
    assert rows["node.state_dir"] == (str(tmp_path / "state"), file)
    assert rows["node.listen"] == ("0.0.0.0:7300", "default")
    assert rows["peers.connect"] == ("10.0.0.7:7301", "command line")
    assert rows["peers.max"] == ("20", file)
    assert rows["keepalive.interval_s"] == ("8", file)
    assert rows["keepalive.timeout_s"] == ("50", "command line")
    assert rows["limits.inbox_size"] == ("128", "board pi-zero-w")
    assert rows["serial.ports"] == ("/dev/ttyUSB0", "command line")
    assert rows["serial.baud"] == ("115200", "board pi-zero-w")
    assert rows["limits.max_pending_requests"] == ("256", "default")
    # It printed and exited: no node, no identity, no state directory.
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "default-state").exists()


def test_print_config_without_anything_shows_defaults(tmp_path: Path) -> None:
    result = edgenode(tmp_path, "run", "--print-config")
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows["node.board"] == ("(none)", "default")
    assert rows["node.state_dir"] == (
        str(tmp_path / "default-state"),
        "environment EDGENODE_STATE_DIR",
    )
    assert rows["keepalive.interval_s"] == ("5", "default")


def test_run_flags_override_the_file(tmp_path: Path) -> None:
    key = key_file(tmp_path)
    path = write(
        tmp_path,
        '[node]\nlisten = "127.0.0.9:7000"\n[peers]\nhandshake_timeout_s = 9\n'
        "[backoff]\ncap_s = 90\n[serial]\nreliable = false\n",
    )
    result = edgenode(
        tmp_path,
        "run",
        "--config",
        str(path),
        "--listen",
        "127.0.0.8:7001",
        "--handshake-timeout",
        "3",
        "--backoff-cap",
        "12",
        "--serial-reliable",
        "--serial-psk-file",
        str(key),
        "--authorise",
        NODE_ID,
        "--print-config",
    )
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows["node.listen"] == ("127.0.0.8:7001", "command line")
    assert rows["peers.handshake_timeout_s"] == ("3", "command line")
    assert rows["backoff.cap_s"] == ("12", "command line")
    assert rows["serial.reliable"] == ("true", "command line")
    assert rows["serial.psk_file"] == (f"{key} (32-byte key)", "command line")
    assert rows["peers.authorised"] == (NODE_ID, "command line")
    assert "k" * 32 not in result.stdout


def assert_one_error_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: {message}"]
    assert result.stdout == ""


def test_run_rejects_bad_config_file_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[keepalive]\ninterval_s = "soon"\n')
    result = edgenode(tmp_path, "run", "--config", str(path), "--print-config")
    assert_one_error_line(
        result, f"{path}: keepalive.interval_s: expected a number > 0, got 'soon'"
    )


def test_run_rejects_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    result = edgenode(tmp_path, "run", "--config", str(path))
    assert_one_error_line(result, f"{path}: cannot read: No such file or directory")


def test_run_rejects_unknown_board(tmp_path: Path) -> None:
    result = edgenode(tmp_path, "run", "--board", "pi-zero")
    assert_one_error_line(
        result,
        "unknown board 'pi-zero'; did you mean pi-zero-w? known boards: esp32, generic-arm64, "
        "pi-3b, pi-4b, pi-5, pi-zero-2-w, pi-zero-w, rp2040",
    )


def test_run_rejects_microcontroller_board(tmp_path: Path) -> None:
    result = edgenode(tmp_path, "run", "--board", "esp32", "--print-config")
    assert_one_error_line(
        result,
        "board 'esp32' is a microcontroller: its profile describes the device end of a UART "
        "link, not a node; node boards: pi-zero-w, pi-zero-2-w, generic-arm64, pi-3b, pi-4b, "
        "pi-5",
    )


# -- peers: one per IP, never the node itself ----------------------------------------------


def test_two_peers_with_one_ip_keep_the_last_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        '[peers]\nconnect = ["10.0.0.2:7300", "10.0.0.3", "10.0.0.2:7301", "10.0.0.3"]\n',
    )
    caplog.set_level(logging.WARNING, logger="edgenode.settings")
    resolved = resolve(config_file=path)
    assert resolved.config.peers == [("10.0.0.2", 7301), ("10.0.0.3", 7300)]
    assert resolved.values["peers.connect"] == resolved.config.peers
    assert resolved.warnings == [
        f"{path}: peers.connect: 10.0.0.2:7300 and 10.0.0.2:7301 are one peer (peers are keyed "
        "by ip address): using 10.0.0.2:7301, the last",
        f"{path}: peers.connect: 10.0.0.3:7300 is listed twice",
    ]
    assert [r.getMessage() for r in caplog.records] == resolved.warnings
    assert {r.levelname for r in caplog.records} == {"WARNING"}


def test_one_ip_written_two_ways_is_one_peer() -> None:
    resolved = resolve(
        command_line={"peers.connect": [("::ffff:10.0.0.2", 7300), ("10.0.0.2", 7302)]}
    )
    assert resolved.config.peers == [("10.0.0.2", 7302)]
    assert resolved.warnings == [
        "--peer: [::ffff:10.0.0.2]:7300 and 10.0.0.2:7302 are one peer (peers are keyed by "
        "ip address): using 10.0.0.2:7302, the last"
    ]


def test_print_config_warns_of_peers_with_one_ip(tmp_path: Path) -> None:
    result = edgenode(
        tmp_path, "run", "--peer", "10.0.0.2:7300", "--peer", "10.0.0.2:7400", "--print-config"
    )
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["peers.connect"] == ("10.0.0.2:7400", "command line")
    [warning] = result.stderr.splitlines()
    assert warning.endswith(
        " WARNING --peer: 10.0.0.2:7300 and 10.0.0.2:7400 are one peer (peers are keyed by "
        "ip address): using 10.0.0.2:7400, the last"
    ), warning


@pytest.mark.parametrize(
    ("listen", "peer", "message"),
    [
        (
            ("127.0.0.5", 7300),
            ("127.0.0.5", 7301),
            "--peer: 127.0.0.5:7301 is this node's own address (node.listen is "
            "127.0.0.5:7300); list the other nodes",
        ),
        (
            ("0.0.0.0", 7355),
            ("127.0.0.5", 7355),
            "--peer: 127.0.0.5:7355 is this node itself: listening on 0.0.0.0:7355, it is "
            "reachable at every address of this host, 127.0.0.5 included; list the other nodes",
        ),
        (
            ("0.0.0.0", 7355),
            ("0.0.0.0", 7355),
            "--peer: 0.0.0.0:7355 is this node itself: listening on 0.0.0.0:7355, it is "
            "reachable at every address of this host, 0.0.0.0 included; list the other nodes",
        ),
        (
            ("::", 7355),
            ("::1", 7355),
            "--peer: [::1]:7355 is this node itself: listening on [::]:7355, it is reachable "
            "at every address of this host, ::1 included; list the other nodes",
        ),
    ],
)
def test_a_peer_that_is_the_node_itself_is_a_config_error(
    listen: tuple[str, int], peer: tuple[str, int], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(command_line={"node.listen": listen, "peers.connect": [peer]})
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("listen", "peer"),
    [
        (("0.0.0.0", 7355), ("127.0.0.5", 7356)),  # another node on this host
        (("0.0.0.0", 7355), ("192.0.2.1", 7355)),  # TEST-NET-1: not an address here
        (("0.0.0.0", 0), ("127.0.0.5", 7300)),  # a port of the kernel's choosing
        (("127.0.0.5", 7300), ("127.0.0.6", 7300)),
    ],
)
def test_other_nodes_on_this_host_are_peers(
    listen: tuple[str, int], peer: tuple[str, int]
) -> None:
    resolved = resolve(command_line={"node.listen": listen, "peers.connect": [peer]})
    assert resolved.config.peers == [peer]


def test_run_refuses_itself_as_its_peer_as_print_config_does(tmp_path: Path) -> None:
    args = ("run", "--listen", "0.0.0.0:7355", "--peer", "127.0.0.5:7355")
    message = (
        "--peer: 127.0.0.5:7355 is this node itself: listening on 0.0.0.0:7355, it is "
        "reachable at every address of this host, 127.0.0.5 included; list the other nodes"
    )
    assert_one_error_line(edgenode(tmp_path, *args, "--print-config"), message)
    assert_one_error_line(edgenode(tmp_path, *args), message)


def test_a_file_naming_the_node_itself_is_named_in_the_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nlisten = "127.0.0.5:7300"\n[peers]\nconnect = ["127.0.0.5"]\n')
    with pytest.raises(ConfigError) as info:
        resolve(config_file=path)
    assert str(info.value) == (
        f"{path}: peers.connect: 127.0.0.5:7300 is this node's own address (node.listen is "
        "127.0.0.5:7300); list the other nodes"
    )
