"""The layers import downward only, and the pure layers import no I/O.

docs/architecture.md, "Layers": proto/, registry, keepalive and firmware_bridge's pure modules
are sans-IO. A running node never imports cryptography.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = [
    *sorted((ROOT / "edgenode" / "proto").glob("*.py")),
    ROOT / "edgenode" / "registry.py",
    ROOT / "edgenode" / "ips.py",
    ROOT / "edgenode" / "keepalive.py",
    ROOT / "edgenode" / "redial.py",
    ROOT / "edgenode" / "refusals.py",
    ROOT / "edgenode" / "errors.py",
    # The uplink's pure parts: settings, topic maps, the queue, the spool's records.
    *(
        ROOT / "edgenode" / "uplink" / f"{name}.py"
        for name in ("config", "topics", "queue", "records")
    ),
    # The board driver (driver.py) and a Linux tty as its stream (tty.py) are
    # the firmware_bridge modules allowed I/O.
    *sorted(
        p for p in (ROOT / "firmware_bridge").glob("*.py") if p.name not in ("driver.py", "tty.py")
    ),
]
FORBIDDEN = {
    "anyio",
    "socket",
    "ssl",
    "serial",
    "time",
    "cryptography",
    "asyncio",
    "random",
    "select",
}
# Modules above the pure layers; a pure module importing one breaks layering.
UPPER = {
    "edgenode.node",
    "edgenode.cli",
    "edgenode.demo",
    "edgenode.transports",
    "edgenode.identity",
    "edgenode.tls",
    "edgenode.config",
    "edgenode.dispatcher",
    "edgenode.dials",
    "edgenode.parts",
    "edgenode.datapath",
    "edgenode.handshake",
    "edgenode.connection",
    "edgenode.requests",
    "edgenode.subscriptions",
    "edgenode.devices",
    "edgenode.learning",
    "edgenode.sending",
    "edgenode.snapshot",
    "edgenode.inbox",
    "edgenode.mailbox",
    "edgenode.bridge",
    "edgenode.control",
    "edgenode.uplink.uplink",
    "edgenode.uplink.client",
    "edgenode.uplink.spool",
    "edgenode.uplink.bench",
    "edgenode.uplink.brokers",
    "edgenode.settings",
    "edgenode.bench",
    "edgenode.testing",
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(path.relative_to(ROOT).with_suffix("").parts[: -node.level])
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module or "")
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_imports_no_io(path: Path) -> None:
    bad = [name for name in _imports(path) if name.split(".")[0] in FORBIDDEN]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    upward = [n for n in _imports(path) if any(n == u or n.startswith(u + ".") for u in UPPER)]
    assert not upward, f"{path.relative_to(ROOT)} imports upper layers {upward}"


def test_firmware_bridge_never_imports_edgenode() -> None:
    for path in (ROOT / "firmware_bridge").rglob("*.py"):
        assert not [n for n in _imports(path) if n.split(".")[0] == "edgenode"], path


def _module_graph() -> dict[str, set[str]]:
    """Every edgenode and firmware_bridge module, and the ones it imports:
    at module level, inside functions and under TYPE_CHECKING alike."""
    mods: dict[str, Path] = {}
    for path in [*ROOT.glob("edgenode/**/*.py"), *ROOT.glob("firmware_bridge/*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = [f"{module}.{alias.name}" for alias in node.names]
                # "from . import x" imports the module x, not the package.
                targets = subs if all(sub in mods for sub in subs) else [module, *subs]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def test_there_are_no_import_circles() -> None:
    """Lazy and type-only imports count: a circle through them is still two
    modules that each need the other."""
    graph = _module_graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_importing_pure_layers_loads_no_io_modules() -> None:
    code = (
        "import sys\n"
        "import edgenode.proto.connection, edgenode.registry, edgenode.keepalive\n"
        "import firmware_bridge.cbor\n"
        # time is loaded by the interpreter itself; the AST check covers it.
        f"bad = sorted(set({sorted(FORBIDDEN - {'time'})!r}) & set(sys.modules))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == ""


def test_running_node_imports_neither_cryptography_nor_cbor2_nor_the_test_kit(
    tmp_path: Path,
) -> None:
    # cryptography is ~11 MB of RSS, cbor2's extension ~1 MB: a node makes
    # keys in a child process and codes frames with firmware_bridge.cbor.
    # edgenode.testing is installed with it, for tests only.
    from edgenode.identity import create_identity

    create_identity(tmp_path / "n")
    code = (
        "import sys, anyio\n"
        "from edgenode.config import NodeConfig\n"
        "from edgenode.node import Node\n"
        "async def main():\n"
        f"    config = NodeConfig(state_dir={str(tmp_path / 'n')!r}, listen_host='127.0.0.2',\n"
        "                        listen_port=0, authorised=frozenset())\n"
        "    async with Node(config):\n"
        "        pass\n"
        "anyio.run(main)\n"
        "qa = ('edgenode.testing', 'edgenode.bench', 'edgenode.loadgen', 'edgenode.simdevice')\n"
        "print('cryptography' in sys.modules, 'cbor2' in sys.modules,\n"
        "      sorted(m for m in sys.modules if m.startswith(qa)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "False False []"


def test_the_command_line_loads_neither_the_node_nor_the_qa_tools_to_start() -> None:
    # `edgenode status` or `edgenode --help` on a Pi Zero: only what the
    # command needs. The benchmark and the fault kit load only for their own
    # commands (`edgenode bench`; pytest).
    code = (
        "import sys\n"
        "import edgenode.cli\n"
        "edgenode.cli.build_parser()\n"
        "qa = ('edgenode.testing', 'edgenode.bench', 'edgenode.bench_tls',\n"
        "      'edgenode.bench_fleet', 'edgenode.bench_fleet_figures', 'edgenode.loadgen',\n"
        "      'edgenode.simdevice',\n"
        "      'edgenode.node', 'edgenode.uplink',\n"
        "      'cryptography', 'cbor2', 'serial')\n"
        "print(sorted(m for m in sys.modules if m in qa or m.startswith('edgenode.testing.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"


def test_a_node_without_an_uplink_never_imports_the_mqtt_library(tmp_path: Path) -> None:
    # paho-mqtt costs ~2.3 MB of RSS; it is the optional edgenode[mqtt] extra.
    from edgenode.identity import create_identity

    create_identity(tmp_path / "n")
    code = (
        "import sys, anyio\n"
        "from edgenode.config import NodeConfig\n"
        "from edgenode.node import Node\n"
        "from edgenode.uplink.config import UplinkConfig\n"
        "async def main(uplink):\n"
        f"    config = NodeConfig(state_dir={str(tmp_path / 'n')!r}, listen_host='127.0.0.2',\n"
        "                        listen_port=0, authorised=frozenset(), uplink=uplink)\n"
        "    async with Node(config):\n"
        "        pass\n"
        "    return 'paho' in sys.modules, 'edgenode.uplink.uplink' in sys.modules\n"
        "print(*anyio.run(main, None))\n"
        "uplink = UplinkConfig(broker='mqtt://127.0.0.1:1', connect_timeout_s=0.1)\n"
        "print(*anyio.run(main, uplink))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.splitlines() == ["False False", "True True"]
