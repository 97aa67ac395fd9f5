"""What the installed package imports, pyproject.toml declares as a runtime dependency.

A library the shipped code imports but only the ``test`` extra installs
works in development and breaks on a board: cbor2 moved to the ``test``
extra because its 6.x releases need a Rust compiler on 32-bit ARM
(docs/arm.md), and the running node codes CBOR with ``firmware_bridge.cbor``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [
    *sorted((ROOT / "edgenode").rglob("*.py")),
    *sorted((ROOT / "firmware_bridge").rglob("*.py")),
]
FIRST_PARTY = {"edgenode", "firmware_bridge"}
# The fault kit's pytest plugin is loaded by pytest itself (an entry point),
# so pytest is there whenever it runs.
RUN_BY_PYTEST = {Path("edgenode/testing/plugin.py"): {"pytest"}}
# Optional features and the extra that installs what they import: the
# uplink loads only on a node configured with one (docs/fleet.md).
OPTIONAL = {Path("edgenode/uplink"): "mqtt"}


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert name, f"unreadable requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def _top_level_imports(path: Path) -> set[str]:
    """Absolute top-level module names ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def _installed_third_party(name: str) -> bool:
    """Whether ``name`` is installed outside the standard library."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return False  # MicroPython-only modules (micropython, machine, ...), builtins
    origin = Path(spec.origin).resolve()
    paths = sysconfig.get_paths()
    return any(origin.is_relative_to(Path(paths[key]).resolve()) for key in ("purelib", "platlib"))


def _distribution_of(module: str) -> str:
    """The normalised name of the installed distribution providing ``module``."""
    for dist in importlib.metadata.distributions():
        top_level = (dist.read_text("top_level.txt") or "").split()
        files = [str(f) for f in dist.files or ()]
        if module in top_level or any(
            f.startswith(f"{module}/") or re.fullmatch(rf"{re.escape(module)}(\..+)?\.(py|so)", f)
            for f in files
        ):
            return _requirement_name(dist.metadata["Name"])
    raise AssertionError(f"no installed distribution provides {module!r}")


def test_shipped_code_imports_only_declared_runtime_dependencies() -> None:
    project = _pyproject()["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    extras = {
        folder: {_requirement_name(r) for r in project["optional-dependencies"][extra]}
        for folder, extra in OPTIONAL.items()
    }
    undeclared = []
    for path in SHIPPED:
        relative = path.relative_to(ROOT)
        allowed = FIRST_PARTY | RUN_BY_PYTEST.get(relative, set())
        also = set().union(*(e for f, e in extras.items() if f in relative.parents))
        for module in sorted(_top_level_imports(path) - allowed):
            if not _installed_third_party(module):
                continue
            dist = _distribution_of(module)
            if dist not in declared | also:
                undeclared.append(f"{path.relative_to(ROOT)} imports {module} ({dist})")
    assert not undeclared, (
        "shipped code imports distributions that are not runtime dependencies "
        f"(declared: {sorted(declared)}): {undeclared}"
    )


def test_cbor2_is_a_test_dependency_only() -> None:
    project = _pyproject()["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    test = {_requirement_name(r) for r in project["optional-dependencies"]["test"]}
    assert "cbor2" not in runtime
    assert "cbor2" in test
