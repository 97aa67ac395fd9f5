// Run one whole session between a device and a host, each in a MicroPython
// runtime of its own (the WebAssembly port from npm, a 32-bit build), with
// the device's heap fixed at a given size: tests/micropython/heap.py calls
// this for each install form and link mode, and searches for the smallest
// heap in which the session completes.
//
//   node .ci/micropython-heap.mjs RUNTIME_MJS DEVICE_DIR HOST_DIR FORM MODE HEAP_BYTES [measure]
//
// DEVICE_DIR and HOST_DIR are copied to /app of each runtime; the harness
// modules are in /app/tests/micropython/heap. FORM "frozen" also gets stub
// modules under /stubs (see heap_frozen.py). Prints the device's "HEAP {json}"
// line and exits 0 if the session completed, 1 if it failed (a MemoryError,
// for example), 2 on a usage or harness error.
//
// The port grows its heap on demand (a split heap); a board's does not. So
// once the device's runtime is up, this driver takes every byte its C heap
// could give to a new heap area, and forbids the WebAssembly memory to grow:
// the device then has exactly HEAP_BYTES, and a MemoryError when that is not
// enough. The line between the runtimes is a pair of buffers in each
// runtime's memory that this driver copies (heap/mailbox.py): moving bytes
// allocates nothing on the device's heap.
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [runtimePath, deviceDir, hostDir, form, mode, heapText, measureFlag] = process.argv.slice(2);
if (!heapText) {
    process.stderr.write(
        "usage: node micropython-heap.mjs RUNTIME_MJS DEVICE_DIR HOST_DIR FORM MODE HEAP_BYTES [measure]\n",
    );
    process.exit(2);
}
const heapBytes = Number(heapText);
const measure = measureFlag === "measure";
const BOUND_MS = 30000;

// The glue reports each refused growth on the console: expected here, so quiet.
const consoleError = console.error;
console.error = (...args) => {
    const text = String(args[0]);
    if (!text.startsWith("growMemory:") && !text.startsWith("Failed to grow the heap")) {
        consoleError(...args);
    }
};
const { loadMicroPython } = await import(pathToFileURL(path.resolve(runtimePath)).href);

async function load(dir, heapsize, label) {
    const mp = await loadMicroPython({
        heapsize,
        stdout: (bytes) => process.stdout.write(bytes),
        stderr: (bytes) => process.stderr.write(bytes),
        linebuffer: false,
    });
    const copyTree = (from, to) => {
        mp.FS.mkdir(to);
        for (const entry of fs.readdirSync(from, { withFileTypes: true })) {
            const source = path.join(from, entry.name);
            if (entry.isDirectory()) {
                copyTree(source, to + "/" + entry.name);
            } else if (entry.isFile()) {
                mp.FS.writeFile(to + "/" + entry.name, fs.readFileSync(source));
            }
        }
    };
    copyTree(dir, "/app");
    return { mp, label, module: mp._module };
}

// The runtime's JavaScript glue reads the current instance from a global:
// point it at the runtime spoken to before every call.
function use(rt) {
    globalThis.Module = rt.module;
    return rt;
}

function run(rt, code) {
    use(rt).mp.runPython(code);
}

function word(rt, address, index) {
    return rt.module.getValue(address + 4 * index, "i32") >>> 0;
}

function setWord(rt, address, index, value) {
    rt.module.setValue(address + 4 * index, value, "i32");
}

// Move what `from` queued for the line into `to`'s receive buffer, if empty.
function carry(from, fromMeta, to, toMeta) {
    const n = word(from, fromMeta, 5);
    if (n === 0 || word(to, toMeta, 2) !== 0) {
        return;
    }
    const src = word(from, fromMeta, 3);
    const dst = word(to, toMeta, 0);
    const count = Math.min(n, word(to, toMeta, 1));
    for (let i = 0; i < count; i++) {
        to.module.setValue(dst + i, from.module.getValue(src + i, "i8"), "i8");
    }
    setWord(to, toMeta, 2, count);
    if (count < n) {
        // Keep the rest in the sender's buffer, at its start.
        for (let i = count; i < n; i++) {
            from.module.setValue(src + i - count, from.module.getValue(src + i, "i8"), "i8");
        }
    }
    setWord(from, fromMeta, 5, n - count);
}

const setupPath =
    "import os, sys\nos.chdir('/app')\nsys.path.insert(0, '/app/tests/micropython/heap')\n";

let host;
let device;
try {
    host = await load(hostDir, 4 * 1024 * 1024, "host");
    run(host, setupPath + "from heap_host import setup, step, state\n");
    device = await load(deviceDir, heapBytes, "device");
} catch (error) {
    process.stderr.write(`heap: cannot start the runtimes: ${error.message}\n`);
    process.exit(2);
}

if (form === "frozen") {
    // A stub per module runs the code heap_device compiled beforehand.
    const stubs = "/stubs/firmware_bridge";
    use(device).mp.FS.mkdir("/stubs");
    device.mp.FS.mkdir(stubs);
    const names = fs.readdirSync(path.join(deviceDir, "firmware_bridge"));
    // heap_device reads the list: listing a directory there needs C heap.
    device.mp.FS.writeFile("/stubs/modules.txt", names.join("\n"));
    // Compiled by heap.py: a stub compiled here would leave its compiler's
    // garbage on the heap that is being measured.
    const stub = fs.readFileSync(path.join(deviceDir, "tests/micropython/heap/stub.mpy"));
    for (const name of names) {
        if (name.endsWith(".py")) {
            device.mp.FS.writeFile(`${stubs}/${name.slice(0, -3)}.mpy`, stub);
        }
    }
}

// From here the device has exactly its heap: no more WebAssembly memory, and
// none of its C heap left for a new heap area (a little is kept for the
// glue's own small buffers, far less than any heap area it would add).
WebAssembly.Memory.prototype.grow = function () {
    throw new RangeError("memory growth disabled by micropython-heap.mjs");
};
{
    const malloc = device.module._malloc;
    // Kept for the glue (runPython copies its code string): far smaller than
    // the heap, so never enough for a new heap area, which is at least as
    // large as the heap already is.
    const glue = malloc(1024);
    for (let size = 1 << 30; size >= 16; size >>= 1) {
        while (malloc(size) !== 0) {
            // taken
        }
    }
    device.module._free(glue);
}

let status;
let deviceMeta;
let hostMeta;
let deviceStep;
let hostStep;
try {
    run(device, setupPath + "from heap_device import setup, phase, step, report\n");
    deviceMeta = use(device).mp.globals.get("setup")(form, mode, measure);
    // One call per step of the setup: this port collects only when a call
    // from JavaScript returns (heap/heap_device.py).
    const phase = device.mp.globals.get("phase");
    while (phase()) {
        // the next step
    }
    deviceStep = device.mp.globals.get("step");
    use(host);
    hostMeta = host.mp.globals.get("setup")(mode);
    hostStep = host.mp.globals.get("step");
} catch (error) {
    process.stderr.write(`heap: setup failed: ${error.message}\n`);
    status = "setup";
}

const started = Date.now();
let hostStatus = 0;
let deviceStatus = 0;
while (status === undefined) {
    try {
        use(device);
        deviceStatus = deviceStep();
    } catch (error) {
        process.stderr.write(`heap: device step failed: ${error.message}\n`);
        status = "device";
        break;
    }
    carry(device, deviceMeta, host, hostMeta);
    use(host);
    hostStatus = hostStep();
    carry(host, hostMeta, device, deviceMeta);
    if (deviceStatus === 2 || hostStatus === 2) {
        status = "failed";
    } else if (deviceStatus === 1 && hostStatus === 1) {
        status = "done";
    } else if (Date.now() - started > BOUND_MS) {
        status = "timeout";
    }
}

try {
    use(device).mp.globals.get("report")();
} catch (error) {
    const figures = { status, error: `report failed: ${error.message}` };
    process.stdout.write(`HEAP ${JSON.stringify(figures)}\n`);
}
if (status !== "done") {
    try {
        use(host);
        process.stdout.write(`HOST ${host.mp.globals.get("state")()}\n`);
    } catch (error) {
        process.stdout.write(`HOST state failed: ${error.message}\n`);
    }
}
process.stdout.write(`RESULT ${status}\n`);
process.exit(status === "done" ? 0 : 1);
