"""Board profiles: every one loads and validates, the listing, and loading from a wheel.

The wheel test builds a real wheel from a copy of the sources and runs
``python -m edgenode boards`` with nothing but that (zipped) wheel on
``PYTHONPATH``: the profiles must come out of the package, not the checkout.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgenode import profiles
from edgenode.config import NodeConfig
from edgenode.errors import ConfigError
from edgenode.profiles import Profile, list_profiles, load_node_profile, load_profile

ROOT = Path(__file__).resolve().parent.parent
NODE_BOARDS = ["pi-zero-w", "pi-zero-2-w", "pi-3b", "pi-4b", "pi-5", "generic-arm64"]
MICROCONTROLLERS = ["esp32", "rp2040"]
ALL_BOARDS = NODE_BOARDS + MICROCONTROLLERS

# What every node profile must size (docs/architecture.md, boards/README.md).
NODE_KEYS = {
    "peers.max",
    "limits.inbox_size",
    "limits.outbox_frames",
    "limits.max_frame_bytes",
    "keepalive.interval_s",
    "keepalive.timeout_s",
    "backoff.base_s",
    "backoff.cap_s",
    "serial.baud",
    "serial.max_frame",
    "serial.keepalive_interval_s",
    "serial.keepalive_timeout_s",
    "serial.dtr",
    "serial.rts",
    "node.memory_budget_mb",
}
SERIAL_KEYS = {k for k in NODE_KEYS if k.startswith("serial.")}

COMMAND_TIMEOUT_S = 30.0
# Building the wheel takes about a second; a slow CI board gets far more.
WHEEL_BUILD_TIMEOUT_S = 120.0


# -- every profile ------------------------------------------------------------------


@pytest.mark.parametrize("name", NODE_BOARDS)
def test_node_profile_loads_and_validates(name: str) -> None:
    profile = load_node_profile(name)
    assert profile.name == name
    assert profile.kind == "node"
    assert profile.description
    assert set(profile.settings) == NODE_KEYS
    config = profile.apply().validate()
    assert config.max_peers == profile.settings["peers.max"]
    assert config.memory_budget_mb * 1024 == profile.memory_budget_kb
    # The profile only sizes the node: where it listens and whom it trusts stay defaults.
    assert config.listen_port == NodeConfig().listen_port
    assert config.authorised is None


@pytest.mark.parametrize("name", MICROCONTROLLERS)
def test_microcontroller_profile_loads_and_validates(name: str) -> None:
    profile = load_profile(name)
    assert profile.kind == "microcontroller"
    assert set(profile.settings) == SERIAL_KEYS
    assert set(profile.uart) == {"id", "tx_pin", "rx_pin", "rxbuf_bytes"}
    profile.apply().validate()  # its link settings are valid for a node's end too
    assert profile.memory_budget_kb < profile.ram_kb


@pytest.mark.parametrize("name", NODE_BOARDS)
def test_node_profile_figures_fit_the_board(name: str) -> None:
    profile = load_profile(name)
    s = profile.settings
    # The node leaves most of the board to the OS and the applications.
    assert profile.memory_budget_kb <= profile.ram_kb // 8
    assert s["keepalive.timeout_s"] >= 3 * s["keepalive.interval_s"]  # type: ignore[operator]
    assert s["limits.inbox_size"] >= s["peers.max"]  # type: ignore[operator]
    # Peers send frames up to 64 KiB without knowing our limit (docs/protocol.md).
    assert s["limits.max_frame_bytes"] == 65536


def test_bigger_boards_get_bigger_caps() -> None:
    budgets = [load_profile(n).memory_budget_kb for n in ["pi-zero-w", "pi-3b", "pi-4b", "pi-5"]]
    peers = [load_profile(n).settings["peers.max"] for n in ["pi-zero-w", "pi-3b", "pi-4b", "pi-5"]]
    assert budgets == sorted(budgets) and len(set(budgets)) == 4
    assert peers == sorted(peers) and len(set(peers)) == 4  # type: ignore[type-var]
    zero = load_profile("pi-zero-w")
    assert zero.ram_kb == 512 * 1024
    assert zero.settings["peers.max"] == 32


def test_uart_defaults_agree_with_the_microcontrollers() -> None:
    """Both ends of a UART must use one baud rate; frames and keepalive match the driver's."""
    from firmware_bridge.driver import Device

    defaults = inspect.signature(Device.__init__).parameters
    driver = {
        "serial.max_frame": defaults["max_frame"].default,
        "serial.keepalive_interval_s": defaults["keepalive_interval_ms"].default / 1000,
        "serial.keepalive_timeout_s": defaults["keepalive_timeout_ms"].default / 1000,
    }
    for name in ALL_BOARDS:
        serial = {k: v for k, v in load_profile(name).settings.items() if k in SERIAL_KEYS}
        lines = {"serial.dtr": True, "serial.rts": True}  # asserted: docs/microcontrollers.md
        assert serial == {**driver, "serial.baud": 115200, **lines}, name


@pytest.mark.parametrize("name", MICROCONTROLLERS)
def test_microcontroller_profile_matches_its_example(name: str) -> None:
    profile = load_profile(name)
    example = (ROOT / "boards" / name / "main.py").read_text()
    call = re.search(r"machine\.UART\((\d+), (\d+), tx=(.+?), rx=(.+?), rxbuf=(\d+)\)", example)
    assert call, f"no UART(...) call in boards/{name}/main.py"
    uart_id, baud, tx, rx, rxbuf = call.groups()
    assert int(uart_id) == profile.uart["id"]
    assert int(baud) == profile.settings["serial.baud"]
    assert re.sub(r"\D", "", tx) == str(profile.uart["tx_pin"])
    assert re.sub(r"\D", "", rx) == str(profile.uart["rx_pin"])
    assert int(rxbuf) == profile.uart["rxbuf_bytes"]


@pytest.mark.parametrize("name", ALL_BOARDS)
def test_profile_file_opens_with_a_comment_saying_why(name: str) -> None:
    lines = (ROOT / "boards" / f"{name}.toml").read_text().splitlines()
    assert lines[0].startswith("# ")
    assert sum(1 for line in lines if line.startswith("#")) >= 5


# -- listing and lookup ----------------------------------------------------------------


def test_list_profiles_lists_node_boards_then_microcontrollers() -> None:
    listed = list_profiles()
    assert all(isinstance(p, Profile) for p in listed)
    assert sorted(p.name for p in listed) == sorted(ALL_BOARDS)
    kinds = [p.kind for p in listed]
    assert kinds == ["node"] * len(NODE_BOARDS) + ["microcontroller"] * len(MICROCONTROLLERS)
    assert [p.name for p in listed][:2] == ["pi-zero-w", "pi-zero-2-w"]


def test_format_profiles_shows_each_board_figures() -> None:
    table = profiles.format_profiles(list_profiles()).splitlines()
    assert table[0].split() == [
        "board",
        "description",
        "RAM",
        "peers",
        "keepalive",
        "memory",
        "budget",
    ]
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == set(ALL_BOARDS)
    assert re.search(r"512 MB\s+32\s+10 s / 30 s\s+40 MB$", rows["pi-zero-w"])
    assert re.search(r"2 GB\s+512\s+5 s / 15 s\s+256 MB$", rows["pi-5"])
    assert re.search(r"264 KB\s+-\s+1 s / 3 s\s+72 KB$", rows["rp2040"])


def test_load_profile_rejects_unknown_name() -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("pi-6")
    assert str(info.value) == (
        "unknown board 'pi-6'; did you mean pi-5? known boards: esp32, generic-arm64, pi-3b, "
        "pi-4b, pi-5, pi-zero-2-w, pi-zero-w, rp2040"
    )


@pytest.mark.parametrize("name", ["../pyproject", "boards/pi-5", "PI-5", "", "pi-5.toml"])
def test_load_profile_rejects_names_that_are_not_profile_names(name: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"^unknown board {re.escape(repr(name))}; .*known boards: esp32, "
    ):
        load_profile(name)


def test_load_node_profile_rejects_microcontroller() -> None:
    with pytest.raises(ConfigError) as info:
        load_node_profile("esp32")
    assert str(info.value).startswith(
        "board 'esp32' is a microcontroller: its profile describes the device end of a UART "
        "link, not a node; node boards: pi-zero-w, pi-zero-2-w, "
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[peers]\nmax = 8\n", "board profile bad: expected a [board] table"),
        (
            '[board]\nkind = "fridge"\n',
            "board profile bad: board.kind: expected 'node' or 'microcontroller', got 'fridge'",
        ),
        (
            '[board]\nkind = "node"\ndescription = "x"\nram_mb = 512\n'
            '[node]\nmemory_budget_mb = 40\nstate_dir = "/tmp"\n',
            "board profile bad: node.state_dir: not a setting a board profile may set",
        ),
        (
            '[board]\nkind = "node"\ndescription = "x"\nram_mb = 512\n[peers]\nmax = 8\n',
            "board profile bad: node.memory_budget_mb: missing",
        ),
        (
            '[board]\nkind = "node"\ndescription = "x"\nram = 512\n[node]\nmemory_budget_mb = 40\n',
            "board profile bad: board.ram_mb: expected an integer >= 1, got nothing",
        ),
        (
            '[board]\nkind = "node"\ndescription = "x"\nram_mb = 512\n'
            "[node]\nmemory_budget_mb = 40\n[peers]\nmax = -1\n",
            "board profile bad: peers.max: expected an integer >= 1, got -1",
        ),
        (
            '[board]\nkind = "microcontroller"\ndescription = "x"\nram_kb = 264\n'
            "memory_budget_kb = 64\n[uart]\nbaud = 9600\n",
            "board profile bad: uart.baud: unknown key; [uart] takes id, tx_pin, rx_pin, "
            "rxbuf_bytes",
        ),
        (
            '[board]\nkind = "microcontroller"\ndescription = "x"\nram_kb = 264\n'
            "memory_budget_kb = 64\n[peers]\nmax = 8\n",
            "board profile bad: peers.max: not a setting a board profile may set",
        ),
        ("[board\n", "board profile bad: invalid TOML: "),
    ],
)
def test_profile_loader_rejects_malformed_profile(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        profiles._load("bad", text.encode())
    assert str(info.value).startswith(message)


def test_boards_command_prints_the_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgenode", "boards"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env={**os.environ, "EDGENODE_STATE_DIR": str(tmp_path / "state")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == profiles.format_profiles(list_profiles()) + "\n"
    assert not (tmp_path / "state").exists()


# -- from an installed wheel ------------------------------------------------------------


def _copy_sources(dest: Path) -> None:
    """What the wheel is built from, without bytecode or earlier build output."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("edgenode", "firmware_bridge", "boards"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheel")
    _copy_sources(src)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=WHEEL_BUILD_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (
        "pip wheel failed (needs setuptools>=70.1, from the test extras):\n" + result.stderr
    )
    (built,) = out.glob("edgenode-*.whl")
    return built


def test_wheel_ships_profiles_but_not_the_microcontroller_examples(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    toml = {n for n in names if n.startswith("edgenode/boards/")}
    assert toml == {f"edgenode/boards/{name}.toml" for name in ALL_BOARDS}
    assert not [n for n in names if n.endswith("main.py") or "esp32/" in n or "rp2040/" in n]
    assert not [n for n in names if n.endswith("README.md")]


def test_wheel_holds_every_module(wheel: Path) -> None:
    """pyproject.toml lists the packages: a new subpackage must be listed there too."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("edgenode", "firmware_bridge"):
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            module = path.relative_to(ROOT).as_posix()
            assert module in names, (
                f"{module} is not in the wheel: list its package in pyproject.toml"
            )


def test_profiles_load_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(wheel)  # a pure-Python wheel is importable as a zip
    env["EDGENODE_STATE_DIR"] = str(tmp_path / "state")
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import edgenode.profiles as p; print(p.__file__); print(p._profiles_dir())",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    module, directory = where.stdout.splitlines()
    assert module.startswith(str(wheel)), module  # not the checkout, not an installed copy
    assert directory.startswith(str(wheel)), directory

    result = subprocess.run(
        [sys.executable, "-m", "edgenode", "boards"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert sorted(listed) == sorted(ALL_BOARDS)

    run = subprocess.run(
        [sys.executable, "-m", "edgenode", "run", "--board", "pi-zero-w", "--print-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert re.search(r"^peers\.max\s+32\s+board pi-zero-w$", run.stdout, re.M), run.stdout


@pytest.mark.parametrize("doc", ["boards/README.md", "docs/configuration.md"])
def test_documented_figures_match_the_profiles(doc: str) -> None:
    text = (ROOT / doc).read_text()
    for profile in list_profiles():
        if doc.startswith("docs/") and not profile.is_node:
            continue
        line = re.search(rf"^\| \[?{re.escape(profile.name)}\]?[ (].*$", text, re.M)
        assert line, f"{doc} has no row for {profile.name}"
        cells = [cell.strip() for cell in line.group(0).strip("|").split("|")]
        _, _, ram, peers, keepalive, budget = profile.row()
        assert any(cell.startswith(ram) for cell in cells), (doc, profile.name, ram)
        for figure in (peers, keepalive, budget):
            assert figure in cells, (doc, profile.name, figure)
