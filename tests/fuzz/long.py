"""The long form of the fuzz suite: a million inputs per decoder.

    python -m tests.fuzz.long                       # 1,000,000 inputs, every decoder
    python -m tests.fuzz.long --inputs 100000 --decoder cbor --decoder link
    python -m tests.fuzz.long --engine atheris      # coverage-guided, if atheris is installed
    python -m tests.fuzz.long --engine micropython --inputs 30000   # on the real MicroPython
    python -m tests.fuzz.long --decoder cbor --replay 8201         # one input again
    python -m tests.fuzz.long --list

The default engine is a seeded mutation fuzzer (tests/fuzz/mutate.py): it
mutates valid encodings (and the mutants the decoder accepted), sometimes
tries raw random bytes, and feeds stream decoders in random chunks. The
same seed gives the same inputs. ``--engine atheris`` runs libFuzzer's
coverage-guided search instead, one child process per decoder, from the
same seeds. Both apply the oracle of tests/fuzz/harness.py to every input:
only documented exceptions, with a proper message; at most
EDGENODE_FUZZ_CPU_LIMIT_S (1 s) of CPU time; peak allocation under the
target's bound; round trips and the target's other checks.

For each decoder it prints the inputs run, inputs per second, how many were
accepted and rejected, the slowest input's CPU time and the largest peak
allocation. Exit status 1 if any input broke the oracle (each failure is
printed with the input in hex, ready for ``--replay``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from . import harness
from .harness import FuzzFailure, Result, Target, run_guarded
from .mutate import mutate, random_cuts

_STATS_MARK = "edgenode-fuzz-stats "


class Stats:
    """Counters for one decoder's run."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs = 0
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.failures: list[str] = []
        self.slowest_s = 0.0
        self.slowest_size = 0
        self.peak_bytes = 0
        self.peak_size = 0
        self.traced = 0
        self.elapsed_s = 0.0
        self._slow: list[tuple[float, int, bytes, list[int]]] = []

    def retime_slowest(self, target: Target, runs: int = 5) -> None:
        """Set ``slowest_s`` to the worst of the slowest inputs' best-of-``runs`` times."""
        for _, _, data, cuts in self._slow:
            best = min(
                run_guarded(target, data, cuts, trace_alloc=False).cpu_s for _ in range(runs)
            )
            if best >= self.slowest_s:
                self.slowest_s = best
                self.slowest_size = len(data)
        self._slow = []

    def add(
        self, data: bytes, cuts: Sequence[int], result: Result | None, failure: str | None = None
    ) -> None:
        self.inputs += 1
        if failure is not None:
            self.failures.append(failure)
            return
        assert result is not None
        if result.accepted:
            self.accepted += 1
        else:
            self.rejected[type(result.error).__name__] += 1
        slow = self._slow
        if len(slow) < 8 or result.cpu_s > slow[0][0]:
            # The slowest few, timed again at the end: one slow reading may be
            # the machine (CPU time advances in scheduler ticks here), not the input.
            entry = (result.cpu_s, self.inputs, data, list(cuts))
            if len(slow) < 8:
                heapq.heappush(slow, entry)
            else:
                heapq.heapreplace(slow, entry)
        if result.peak_bytes >= 0:
            self.traced += 1
            if result.peak_bytes > self.peak_bytes:
                self.peak_bytes = result.peak_bytes
                self.peak_size = len(data)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": self.inputs,
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "failures": self.failures,
            "slowest_s": self.slowest_s,
            "slowest_size": self.slowest_size,
            "peak_bytes": self.peak_bytes,
            "peak_size": self.peak_size,
            "traced": self.traced,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        stats = cls(d["name"])
        for key, value in d.items():
            if key == "rejected":
                stats.rejected = Counter(value)
            else:
                setattr(stats, key, value)
        return stats

    def line(self) -> str:
        rate = self.inputs / self.elapsed_s if self.elapsed_s else 0.0
        rejected = sum(self.rejected.values())
        return (
            f"{self.name:<14} {self.inputs:>9} {self.elapsed_s:>8.1f} {rate:>9.0f} "
            f"{self.accepted:>9} {rejected:>9} {self.slowest_s * 1000:>10.3f} "
            f"{self.peak_bytes:>10} {len(self.failures):>8}"
        )


HEADER = (
    f"{'decoder':<14} {'inputs':>9} {'seconds':>8} {'inputs/s':>9} {'accepted':>9} "
    f"{'rejected':>9} {'slowest ms':>10} {'peak bytes':>10} {'failures':>8}"
)


#: Inputs traced (or not) in a row: see harness.tracing.
_BLOCK = 100


def _guarded(stats: Stats, target: Target, data: bytes, cuts: Sequence[int], every: int) -> bool:
    """Run one input; trace its allocation if its block of inputs is one in ``every``."""
    trace = (stats.inputs // _BLOCK) % every == 0
    if trace != tracemalloc.is_tracing():
        if trace:
            tracemalloc.start()
        else:
            tracemalloc.stop()
    try:
        result = run_guarded(target, data, cuts, trace_alloc=trace)
    except FuzzFailure as exc:
        stats.add(data, cuts, None, str(exc))
        return False
    stats.add(data, cuts, result)
    return result.accepted


def fuzz_builtin(
    target: Target, inputs: int, seed: int, alloc_every: int, max_failures: int, quiet: bool
) -> Stats:
    """Run ``inputs`` mutated inputs through ``target`` with the seeded engine."""
    rnd = random.Random(f"{seed}:{target.name}")
    seeds = [target.valid(rnd) for _ in range(256)]
    found: list[bytes] = []  # accepted mutants: valid in ways the seeds are not
    stats = Stats(target.name)
    start = time.perf_counter()
    report_at = start + 30
    for i in range(inputs):
        roll = rnd.random()
        if roll < 0.03:
            data = rnd.choice(seeds)
        elif roll < 0.08:
            data = rnd.randbytes(rnd.choice((0, 1, 4, 16, 64, 256)))
        else:
            pool = seeds if not found or rnd.random() < 0.7 else found
            data = mutate(rnd.choice(pool), rnd, seeds, target.max_input)
        cuts = random_cuts(rnd, len(data)) if target.streaming else []
        accepted = _guarded(stats, target, data, cuts, alloc_every)
        if accepted and roll >= 0.08:
            if len(found) < 512:
                found.append(data)
            else:
                found[rnd.randrange(512)] = data
        if len(stats.failures) >= max_failures:
            break
        if not quiet and i % 1024 == 0 and time.perf_counter() > report_at:
            report_at += 30
            done = time.perf_counter() - start
            print(f"  {target.name}: {i} inputs, {i / done:.0f}/s", file=sys.stderr, flush=True)
    stats.elapsed_s = time.perf_counter() - start
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    if not stats.failures:
        stats.retime_slowest(target)
    return stats


# --- atheris --------------------------------------------------------------------


def _atheris_child(name: str, inputs: int, seed: int, alloc_every: int, corpus: str) -> None:
    """Run libFuzzer on one decoder; print the stats line after ``inputs`` inputs."""
    import atheris  # type: ignore[import-not-found]

    already = [m for m in sys.modules if m.split(".")[0] in ("edgenode", "firmware_bridge")]
    assert not already, f"imported before instrumentation: {already}"
    with atheris.instrument_imports(include=["edgenode", "firmware_bridge"]):
        from .targets import TARGETS
    harness.ALLOC_SCALE = 4
    target = TARGETS[name]
    max_len = target.max_input
    stats = Stats(name)
    start = time.perf_counter()

    def one_input(raw: bytes) -> None:
        # The first byte picks where a stream is cut; the rest is the input.
        data = raw[1:]
        cuts = random_cuts(random.Random(raw[0]), len(data)) if raw and target.streaming else []
        _guarded(stats, target, data, cuts, alloc_every)
        # Stop at the first failure (libFuzzer would not go on anyway), or when done.
        if stats.inputs >= inputs or stats.failures:
            stats.elapsed_s = time.perf_counter() - start
            if not stats.failures:
                stats.retime_slowest(target)
            print(_STATS_MARK + json.dumps(stats.as_dict()), flush=True)
            sys.stderr.flush()
            os._exit(0)

    rnd = random.Random(f"{seed}:{name}")
    for i in range(64):
        with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
            f.write(b"\x00" + target.valid(rnd))
    args = [
        sys.argv[0],
        corpus,
        f"-runs={inputs + 1000}",
        f"-seed={seed + 1}",
        f"-max_len={max_len + 1}",
        "-rss_limit_mb=2048",
        "-timeout=20",
        "-print_final_stats=0",
    ]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


def fuzz_atheris(target: Target, inputs: int, seed: int, alloc_every: int, quiet: bool) -> Stats:
    with tempfile.TemporaryDirectory(prefix=f"edgenode-fuzz-{target.name}-") as corpus:
        cmd = [
            sys.executable,
            "-m",
            "tests.fuzz.long",
            "--atheris-child",
            target.name,
            "--corpus",
            corpus,
            "--inputs",
            str(inputs),
            "--seed",
            str(seed),
            "--alloc-every",
            str(alloc_every),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(_STATS_MARK):
            return Stats.from_dict(json.loads(line[len(_STATS_MARK) :]))
    stats = Stats(target.name)
    tail = "\n".join(proc.stderr.splitlines()[-30:])
    stats.failures.append(f"{target.name}: atheris exited with {proc.returncode}:\n{tail}")
    return stats


def _run_one(job: tuple[str, str, int, int, int, int, bool]) -> dict[str, Any]:
    """Fuzz one decoder (in this process or a pool's); return its stats as a dict."""
    from .targets import TARGETS

    name, engine, inputs, seed, alloc_every, max_failures, quiet = job
    target = TARGETS[name]
    if engine == "atheris":
        return fuzz_atheris(target, inputs, seed, alloc_every, quiet).as_dict()
    return fuzz_builtin(target, inputs, seed, alloc_every, max_failures, quiet).as_dict()


def _cap_address_space(extra_bytes: int = 1 << 30) -> None:
    """Make an allocation of more than ``extra_bytes`` fail with MemoryError.

    tracemalloc may watch only some inputs (``--alloc-every``); this watches
    all of them, coarsely: a decoder that believes a length field and asks
    for gigabytes raises MemoryError, which the oracle reports.
    """
    try:
        import resource

        with open("/proc/self/status") as f:
            vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration, ValueError):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_kb * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or soft > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


# --- MicroPython -------------------------------------------------------------------

_RUNTIME = ".ci/mp/node_modules/@micropython/micropython-webassembly-pyscript/micropython.mjs"


def fuzz_micropython(inputs: int) -> int:
    """Run tests/fuzz/mp_fuzz.py on the real MicroPython runtime; return its exit status."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runtime = os.path.join(root, _RUNTIME)
    if not os.path.exists(runtime) or shutil.which("node") is None:
        print(
            "error: the MicroPython runtime is not installed: run `bash .ci/micropython.sh` once",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="edgenode-mp-fuzz-") as tree:
        shutil.copytree(
            os.path.join(root, "firmware_bridge"),
            os.path.join(tree, "firmware_bridge"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        shutil.copy(os.path.join(root, "tests", "fuzz", "mp_fuzz.py"), tree)
        with open(os.path.join(tree, "main.py"), "w") as f:
            f.write(f"import sys\nimport mp_fuzz\nsys.exit(1 if mp_fuzz.run({inputs}) else 0)\n")
        runner = os.path.join(root, ".ci", "micropython-run.mjs")
        start = time.perf_counter()
        status = subprocess.run(["node", runner, runtime, tree, "main.py"], check=False).returncode
    print(f"micropython: {time.perf_counter() - start:.0f} s, exit status {status}")
    return status


# --- command line ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, *, cap_memory: bool = False) -> int:
    """The command line; ``cap_memory`` (the command line's, not tests') caps the address space."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz.long", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per decoder")
    parser.add_argument("--decoder", action="append", help="fuzz only this one (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutation engine")
    parser.add_argument(
        "--engine",
        choices=("builtin", "atheris", "micropython"),
        default="builtin",
        help="builtin: seeded mutation (default); atheris: coverage-guided libFuzzer; "
        "micropython: firmware_bridge's decoders on the real MicroPython runtime",
    )
    parser.add_argument(
        "--alloc-every",
        type=int,
        default=10,
        metavar="K",
        help="trace allocation on one block of 100 inputs in K (tracemalloc makes a decode "
        "about 5 times slower; default 10; every input is held to a 1 GiB address-space cap)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="fuzz N decoders at once (processes)"
    )
    parser.add_argument("--max-failures", type=int, default=5, help="per decoder, then stop")
    parser.add_argument("--replay", metavar="HEX", help="run one input (hex) and show the result")
    parser.add_argument("--cuts", default="", help="with --replay: comma-separated cut offsets")
    parser.add_argument("--list", action="store_true", help="list the decoders")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--atheris-child", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.atheris_child:
        # Before anything imports the decoders: atheris instruments them on import.
        _atheris_child(args.atheris_child, args.inputs, args.seed, args.alloc_every, args.corpus)
        return 0  # not reached: the child exits from inside libFuzzer

    from .targets import TARGETS, LinkTarget

    if args.list:
        for name, target in TARGETS.items():
            summary = (type(target).__doc__ or "").split("\n")[0].rstrip(".")
            if isinstance(target, LinkTarget):
                mode = "reliable" if target.kw["reliable"] else "best-effort"
                summary += f" ({target.receiver_role}, {mode}{', psk' if target.kw['psk'] else ''})"
            print(f"{name:<14} {summary}")
        return 0
    names = args.decoder or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown decoder {', '.join(unknown)}; choose from {', '.join(TARGETS)}")

    if args.replay is not None:
        if len(names) != 1:
            parser.error("--replay needs exactly one --decoder")
        target = TARGETS[names[0]]
        data = bytes.fromhex(args.replay)
        cuts = [int(c) for c in args.cuts.split(",") if c]
        try:
            result = run_guarded(target, data, cuts)
        except FuzzFailure as exc:
            print(f"FAILED {exc}")
            return 1
        outcome = "accepted" if result.accepted else f"rejected: {result.error!r}"
        print(
            f"{target.name}: {outcome}; {result.cpu_s * 1000:.2f} ms cpu, "
            f"{result.peak_bytes} bytes peak\nvalue: {result.value!r:.500}"
        )
        return 0

    if args.engine == "micropython":
        return fuzz_micropython(args.inputs)
    if args.engine == "atheris":
        try:
            import atheris  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            print("error: atheris is not installed (pip install atheris)", file=sys.stderr)
            return 2

    print(
        f"engine {args.engine}, seed {args.seed}, {args.inputs} inputs per decoder, "
        f"allocation traced on 1 input in {args.alloc_every}",
        flush=True,
    )
    print(HEADER, flush=True)
    total_start = time.perf_counter()
    jobs = [
        (name, args.engine, args.inputs, args.seed, args.alloc_every, args.max_failures, args.quiet)
        for name in names
    ]
    all_stats = []
    if cap_memory and args.engine == "builtin":
        _cap_address_space()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            for result in pool.map(_run_one, jobs):
                all_stats.append(Stats.from_dict(result))
                print(all_stats[-1].line(), flush=True)
    else:
        for job in jobs:
            all_stats.append(Stats.from_dict(_run_one(job)))
            print(all_stats[-1].line(), flush=True)
    total = time.perf_counter() - total_start
    print(f"total {sum(s.inputs for s in all_stats)} inputs in {total:.0f} s")
    failed = [f for s in all_stats for f in s.failures]
    for failure in failed:
        print(f"\nFAILED {failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(cap_memory=True))
