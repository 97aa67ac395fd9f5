// Run a script on the real MicroPython runtime (the WebAssembly port from
// npm) with a directory of the host copied into its filesystem.
//
//   node .ci/micropython-run.mjs RUNTIME_MJS HOST_DIR SCRIPT
//
// HOST_DIR is copied to /app in the runtime's in-memory filesystem, /app is
// the working directory, and SCRIPT (a path inside HOST_DIR) runs as
// __main__ with __file__ set. The exit status is the script's: 0, the code of
// its SystemExit, or 1 for an uncaught exception.
//
// Why not the port's own command line (`node micropython.mjs script.py`):
// its filesystem is in memory and holds none of the host's files, so the
// script cannot import firmware_bridge; and it exits 0 even when the script
// raises or calls sys.exit(1).
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [runtimePath, hostDir, script] = process.argv.slice(2);
if (!script) {
    process.stderr.write("usage: node micropython-run.mjs RUNTIME_MJS HOST_DIR SCRIPT\n");
    process.exit(2);
}

const { loadMicroPython } = await import(pathToFileURL(path.resolve(runtimePath)).href);
const mp = await loadMicroPython({
    stdout: (bytes) => process.stdout.write(bytes),
    stderr: (bytes) => process.stderr.write(bytes),
    linebuffer: false,
});

function copyTree(from, to) {
    mp.FS.mkdir(to);
    for (const entry of fs.readdirSync(from, { withFileTypes: true })) {
        const source = path.join(from, entry.name);
        const target = to + "/" + entry.name;
        if (entry.isDirectory()) {
            copyTree(source, target);
        } else if (entry.isFile()) {
            mp.FS.writeFile(target, fs.readFileSync(source));
        }
    }
}
copyTree(hostDir, "/app");

mp.runPython("import os\nos.chdir('/app')\n");
mp.globals.set("__file__", script);
try {
    mp.runPython(fs.readFileSync(path.join(hostDir, script), "utf8"));
} catch (error) {
    if (error.name !== "PythonError") {
        throw error;
    }
    if (error.type !== "SystemExit") {
        process.stderr.write(error.message);
        process.exit(1);
    }
    // The message ends "SystemExit" or "SystemExit: <its argument>".
    const argument = /SystemExit(?:: (.*))?\s*$/.exec(error.message)?.[1];
    if (argument === undefined || argument === "None") {
        process.exit(0);
    }
    if (/^-?\d+$/.test(argument)) {
        const code = Number(argument);
        process.exit(code === 0 ? 0 : code & 0xff || 1);
    }
    process.stderr.write(argument + "\n");
    process.exit(1);
}
