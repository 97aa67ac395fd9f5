"""The layers import downward only, and the pure layers import no I/O.

DESIGN.md: proto/, registry, keepalive and firmware_bridge's pure modules
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
    ROOT / "edgenode" / "keepalive.py",
    ROOT / "edgenode" / "errors.py",
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
    "edgenode.config",
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
        "print('cryptography' in sys.modules, 'cbor2' in sys.modules,\n"
        "      any(m.startswith('edgenode.testing') for m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "False False False"
