"""Local MQTT brokers as child processes, for the uplink's tests and its benchmark.

Never imported by a running node. :class:`Mosquitto` (Debian package
``mosquitto``) and :class:`NatsServer` (``nats-server``, which speaks MQTT
3.1.1 with JetStream) run in the foreground on loopback ports, from a
configuration file written here, and are stopped by PID: ``kill()``
(SIGKILL, as a crash), ``terminate()`` (SIGTERM) and ``restart()`` on the
same ports. ``start()`` returns once every listener accepts connections.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ..errors import EdgeNodeError
from ..testing.procs import free_port

_READY_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0


class BrokerError(EdgeNodeError):
    """A local broker could not be started or stopped."""


def find_program(name: str) -> str | None:
    """``name`` on PATH or in /usr/sbin (where Debian puts both brokers)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


class BrokerProcess:
    """A broker program run in the foreground with a config file of ours."""

    program = ""
    package = ""

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.config_path = self.workdir / f"{self.program}.conf"
        self.log_path = self.workdir / f"{self.program}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def config_text(self) -> str:
        raise NotImplementedError

    def ports(self) -> list[int]:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> BrokerProcess:
        """Write the config, start the broker, wait until it accepts connections.

        Raises :class:`BrokerError` when the program is missing, exits, or
        does not listen within 20 s.
        """
        if find_program(self.program) is None:
            raise BrokerError(f"{self.program} is not installed (Debian package {self.package})")
        self.config_path.write_text(self.config_text())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.starts += 1
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for port in self.ports():
            while not self._accepts(port):
                if self.proc.poll() is not None:
                    raise BrokerError(
                        f"{self.program} exited with status {self.proc.returncode}: "
                        f"{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    self.kill()
                    raise BrokerError(
                        f"{self.program} did not listen on {self.host}:{port} within "
                        f"{_READY_TIMEOUT_S:g} s: {self.log_tail()}"
                    )
                time.sleep(0.02)  # polling the port, bounded by the deadline
        return self

    def _accepts(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=1.0):
                return True
        except OSError:
            return False

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def _signal(self, signum: int) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, signum)
        try:
            code = proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            code = proc.wait(timeout=_STOP_TIMEOUT_S)
        self.proc = None
        return code

    def kill(self) -> int | None:
        """SIGKILL the broker (a crash: nothing saved, connections reset)."""
        return self._signal(signal.SIGKILL)

    def terminate(self) -> int | None:
        """SIGTERM the broker (a clean stop)."""
        return self._signal(signal.SIGTERM)

    def restart(self) -> BrokerProcess:
        """Start again on the same ports (after :meth:`kill` or :meth:`terminate`)."""
        if self.proc is not None:
            self.terminate()
        return self.start()

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Mosquitto(BrokerProcess):
    """Eclipse Mosquitto 2 on loopback: a plain listener, and optionally TLS ones.

    ``users`` maps user names to passwords (a password file made with
    ``mosquitto_passwd``); without users, anonymous clients are allowed.
    ``tls`` is (CA file, certificate file, key file) for a TLS listener
    (``tls_port``) and one that also requires a client certificate signed
    by the same CA (``mtls_port``).
    """

    program = "mosquitto"
    package = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        *,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        max_packet_bytes: int | None = None,
    ) -> None:
        super().__init__(workdir, host)
        self.users = dict(users or {})
        self.tls = tls
        self.max_packet_bytes = max_packet_bytes
        self.port = free_port(host)
        self.tls_port = free_port(host) if tls else None
        self.mtls_port = free_port(host) if tls else None
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.passwd_path = self.workdir / "passwd"

    def url(self, kind: str = "plain") -> str:
        port = {"plain": self.port, "tls": self.tls_port, "mtls": self.mtls_port}[kind]
        return f"{'mqtt' if kind == 'plain' else 'mqtts'}://{self.host}:{port}"

    def ports(self) -> list[int]:
        return [p for p in (self.port, self.tls_port, self.mtls_port) if p is not None]

    def command(self) -> list[str]:
        return [find_program("mosquitto") or "mosquitto", "-c", str(self.config_path)]

    def _write_passwords(self) -> None:
        tool = find_program("mosquitto_passwd")
        if tool is None:
            raise BrokerError("mosquitto_passwd is not installed (Debian package mosquitto)")
        self.passwd_path.unlink(missing_ok=True)
        self.passwd_path.touch(mode=0o600)
        for user, password in self.users.items():
            subprocess.run(
                [tool, "-b", str(self.passwd_path), user, password],
                check=True,
                capture_output=True,
            )

    def config_text(self) -> str:
        lines = [
            "per_listener_settings false",
            # Started as root, mosquitto would switch to the user "mosquitto",
            # who cannot read the test's private files: stay who we are.
            *(["user root"] if os.geteuid() == 0 else []),
            f"allow_anonymous {'false' if self.users else 'true'}",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_timestamp false",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
        ]
        if self.max_packet_bytes is not None:
            lines.append(f"max_packet_size {self.max_packet_bytes}")
        if self.users:
            self._write_passwords()
            lines.append(f"password_file {self.passwd_path}")
        lines += ["", f"listener {self.port} {self.host}"]
        if self.tls is not None:
            ca, cert, key = self.tls
            for port, require in ((self.tls_port, False), (self.mtls_port, True)):
                lines += [
                    "",
                    f"listener {port} {self.host}",
                    f"cafile {ca}",
                    f"certfile {cert}",
                    f"keyfile {key}",
                    f"require_certificate {'true' if require else 'false'}",
                ]
        return "\n".join(lines) + "\n"


class NatsServer(BrokerProcess):
    """nats-server with its MQTT listener (which needs JetStream), no authentication."""

    program = "nats-server"
    package = "nats-server"

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        super().__init__(workdir, host)
        self.port = free_port(host)  # MQTT
        self.nats_port = free_port(host)
        self.store_dir = self.workdir / "jetstream"

    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def ports(self) -> list[int]:
        return [self.nats_port, self.port]

    def command(self) -> list[str]:
        return [find_program("nats-server") or "nats-server", "-c", str(self.config_path)]

    def config_text(self) -> str:
        return (
            "server_name: edgenode_test\n"
            f"listen: {self.host}:{self.nats_port}\n"
            f"jetstream {{ store_dir: {str(self.store_dir)!r} }}\n"
            f"mqtt {{ listen: {self.host}:{self.port} }}\n"
        ).replace("'", '"')
