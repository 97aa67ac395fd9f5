"""Run the tests in this directory without pytest: on MicroPython, or on CPython.

    python3 tests/micropython/run.py         # CPython, from anywhere
    bash .ci/micropython.sh                  # the real MicroPython runtime

Imports every ``test_*.py`` module next to this file and calls each of its
``test_*`` functions (no arguments, no fixtures, synchronous: this port's
asyncio cannot ``asyncio.run``). Prints one line per failure and ends with
the line ``N passed, M failed``, which CI reads; exits 1 if anything failed
or nothing ran.

A module may name tests that are known to fail on the runtime in use, with
the reason, in a dict ``KNOWN_FAILURES``: such a test's failure is reported
as ``xfail`` and not counted; its passing is counted as a failure, so the
entry is removed once the bug is fixed.
"""

import os
import sys

try:
    from io import StringIO
except ImportError:  # a MicroPython build without io
    StringIO = None


def _normalise(path: str) -> str:
    # No os.path on MicroPython: make ``path`` absolute and drop . and ..
    if not path.startswith("/"):
        path = os.getcwd() + "/" + path
    parts = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


def _frames(exc: BaseException) -> list:
    """Return ``exc``'s traceback as ``[(file name, line), ...]``, outermost first."""
    frames = []
    if hasattr(sys, "print_exception"):  # MicroPython: no __traceback__
        if StringIO is None:
            return frames
        out = StringIO()
        sys.print_exception(exc, out)
        for line in out.getvalue().split("\n"):
            # '  File "tests/micropython/test_x.py", line 12, in test_y'
            pieces = line.split('"')
            if len(pieces) >= 3 and pieces[0].strip() == "File":
                line_no = pieces[2].split(",")[1].replace("line", "").strip()
                frames.append((pieces[1].split("/")[-1], line_no))
        return frames
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename.split("/")[-1], str(tb.tb_lineno)))
        tb = tb.tb_next
    return frames


def _where(exc: BaseException) -> str:
    """Return where ``exc`` came from: ``test_x.py:12``, or ``test_x.py:12 > cbor.py:97``
    when it was raised deeper than the test function."""
    # The runner's own frames ("<stdin>" when the runtime runs it from a string).
    frames = [f for f in _frames(exc) if f[0] not in ("run.py", "<stdin>")]
    if not frames:
        return ""
    first = frames[0][0] + ":" + frames[0][1]
    last = frames[-1][0] + ":" + frames[-1][1]
    return first if first == last else first + " > " + last


def _describe(exc: BaseException) -> str:
    where = _where(exc)
    text = type(exc).__name__
    message = str(exc)
    if message:
        text += ": " + message
    return text + (" (" + where + ")" if where else "")


def _test_modules(here: str) -> list:
    names = []
    for name in os.listdir(here):
        if name.startswith("test_") and name.endswith(".py"):
            names.append(name[:-3])
    names.sort()
    return names


def main() -> int:
    """Run every test; print failures and the summary; return the exit status."""
    here = _normalise(__file__)
    here = here[: here.rfind("/")] or "/"
    root = _normalise(here + "/../..")
    # This directory for the test modules, the repository root for
    # firmware_bridge (from the root, MicroPython's "" already finds it).
    for path in (root, here):
        if path not in sys.path:
            sys.path.insert(0, path)

    passed = failed = xfailed = 0
    for module_name in _test_modules(here):
        try:
            module = __import__(module_name)
        except Exception as exc:
            failed += 1
            print(f"FAIL {module_name} (import): {_describe(exc)}")
            continue
        known = getattr(module, "KNOWN_FAILURES", {})
        tests = [name for name in dir(module) if name.startswith("test_")]
        # Module dicts are not ordered on MicroPython: sort for a stable order.
        tests.sort()
        for test_name in known:
            if test_name not in tests:
                failed += 1
                print(f"FAIL {module_name}: KNOWN_FAILURES names no test {test_name}")
        for test_name in tests:
            test = getattr(module, test_name)
            if not callable(test):
                continue
            label = module_name + "." + test_name
            try:
                result = test()
                if result is not None:
                    # An async def returns a coroutine: it would pass unrun.
                    if hasattr(result, "close"):
                        result.close()
                    raise TypeError(f"test returned {type(result).__name__}, not None")
            except Exception as exc:
                if test_name in known:
                    xfailed += 1
                    print(f"xfail {label}: {_describe(exc)} [known: {known[test_name]}]")
                else:
                    failed += 1
                    print(f"FAIL {label}: {_describe(exc)}")
                continue
            if test_name in known:
                failed += 1
                print(f"FAIL {label}: passed, but KNOWN_FAILURES says it fails; remove it there")
            else:
                passed += 1

    if xfailed:
        print(f"{xfailed} known failures (xfail), not counted")
    if passed + failed == 0:
        print("no tests found in " + here)
    # Says whether the code under test ran from source or from .mpy files.
    loaded = [
        getattr(module, "__file__", None) or name
        for name, module in sorted(sys.modules.items())
        if name.startswith("firmware_bridge")
    ]
    print("loaded: " + ", ".join("/".join(path.split("/")[-2:]) for path in loaded))
    impl = sys.implementation
    version = ".".join(str(n) for n in impl.version[:3])
    print(f"{impl.name} {version} on {sys.platform}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    status = main()
    if status:
        raise SystemExit(status)
