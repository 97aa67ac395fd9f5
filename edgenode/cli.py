"""The ``edgenode`` command line.

Errors print one line, ``error: ...``, without a traceback. Usage and
configuration errors exit 2; other failures exit 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import DEFAULT_PORT, NodeConfig, parse_address
from .errors import ConfigError, EdgeNodeError

log = logging.getLogger("edgenode")

AUTHORISED_FILE = "authorised_nodes"


def default_state_dir() -> Path:
    """``$EDGENODE_STATE_DIR``, else ``$XDG_STATE_HOME/edgenode`` (``~/.local/state/edgenode``)."""
    env = os.environ.get("EDGENODE_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "edgenode"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    # "nan" fails the comparison; "inf" would make a timer that never fires.
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgenode",
        description="A small peer-to-peer node for edge boards.",
    )
    parser.add_argument("--version", action="version", version=f"edgenode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def with_state(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir",
            type=Path,
            default=None,
            help="identity and authorised nodes (default: $EDGENODE_STATE_DIR or "
            "~/.local/state/edgenode)",
        )

    run = sub.add_parser("run", help="run a node until SIGINT or SIGTERM")
    with_state(run)
    run.add_argument(
        "--listen",
        default=f"0.0.0.0:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help=f"address to listen on (default 0.0.0.0:{DEFAULT_PORT})",
    )
    run.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a peer to dial and keep connected (repeatable)",
    )
    run.add_argument(
        "--authorise",
        action="append",
        default=[],
        metavar="NODE_ID",
        help=f"also trust this node ID (repeatable; adds to {AUTHORISED_FILE} in the state dir)",
    )
    run.add_argument(
        "--keepalive-interval",
        type=_positive_float,
        metavar="S",
        help="send a ping after this long without sending (default 5)",
    )
    run.add_argument(
        "--keepalive-timeout",
        type=_positive_float,
        metavar="S",
        help="declare a peer dead after this long without a frame (default 15)",
    )
    run.add_argument(
        "--handshake-timeout",
        type=_positive_float,
        metavar="S",
        help="give up a handshake after this long (default 5)",
    )
    run.add_argument(
        "--backoff-cap",
        type=_positive_float,
        metavar="S",
        help="longest wait between redials (default 30)",
    )
    run.add_argument(
        "--serial",
        action="append",
        default=[],
        metavar="PORT[:BAUD]",
        help="bridge the microcontroller on this UART (repeatable; default 115200 baud)",
    )
    run.add_argument(
        "--serial-psk-file",
        type=Path,
        metavar="FILE",
        help="pre-shared key (16-64 bytes) authenticating every UART frame",
    )
    run.add_argument(
        "--serial-reliable",
        action="store_true",
        help="ask devices for reliable delivery (acks and retransmission)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--demo-app", action="store_true", help=argparse.SUPPRESS)

    ident = sub.add_parser("id", help="print this node's ID")
    with_state(ident)

    keygen = sub.add_parser("keygen", help="create this node's key and certificate")
    with_state(keygen)
    keygen.add_argument("--force", action="store_true", help="replace an existing identity")

    auth = sub.add_parser("authorise", help="trust a node ID")
    with_state(auth)
    auth.add_argument("node_id", metavar="NODE_ID")

    bench = sub.add_parser("bench", help="measure this machine: serial framing and rate")
    bench.add_argument("--runs", type=int, default=5, help="repeat each measurement (default 5)")
    bench.add_argument("--messages", type=int, default=2000, help="messages per run")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")

    demo = sub.add_parser("demo", help="three nodes on 127.0.0.2-4: connect, fail, rejoin")
    demo.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        metavar="S",
        help="keep the demo running at least this long",
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo's state directory")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def cmd_id(args: argparse.Namespace) -> int:
    from .identity import load_identity

    print(load_identity(args.state_dir or default_state_dir()).node_id)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from .identity import create_identity

    state_dir = args.state_dir or default_state_dir()
    identity = create_identity(state_dir, overwrite=args.force)
    print(identity.node_id)
    print(f"identity written to {state_dir}", file=sys.stderr)
    return 0


def cmd_authorise(args: argparse.Namespace) -> int:
    from .identity import add_authorised, parse_node_id

    state_dir = args.state_dir or default_state_dir()
    node_id = parse_node_id(args.node_id)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"state directory {state_dir} is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot create state directory {state_dir}: {exc.strerror}") from None
    added = add_authorised(os.path.join(state_dir, AUTHORISED_FILE), node_id)
    print(f"{'authorised' if added else 'already authorised'}: {node_id}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from .identity import load_authorised, load_or_create_identity, parse_node_id
    from .transports.serial import parse_serial_spec

    _setup_logging(args.log_level)
    state_dir = args.state_dir or default_state_dir()
    host, port = parse_address(args.listen)
    peers = [parse_address(p) for p in args.peer]
    authorised = set(load_authorised(os.path.join(state_dir, AUTHORISED_FILE)))
    authorised.update(parse_node_id(n) for n in args.authorise)
    serial_psk = None
    if args.serial_psk_file is not None:
        try:
            mode = args.serial_psk_file.stat().st_mode & 0o777
            if mode & 0o077:
                raise ConfigError(
                    f"--serial-psk-file: {args.serial_psk_file} is readable by others "
                    f"(mode {mode:04o}); run: chmod 600 {args.serial_psk_file}"
                )
            serial_psk = args.serial_psk_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"--serial-psk-file: cannot read {args.serial_psk_file}: {exc.strerror}"
            ) from None
    config = NodeConfig(
        state_dir=state_dir,
        listen_host=host,
        listen_port=port,
        peers=peers,
        authorised=frozenset(authorised),
        serial_ports=[parse_serial_spec(spec) for spec in args.serial],
        serial_psk=serial_psk,
        serial_reliable=args.serial_reliable,
    )
    overrides = {
        "keepalive_interval_s": args.keepalive_interval,
        "keepalive_timeout_s": args.keepalive_timeout,
        "handshake_timeout_s": args.handshake_timeout,
        "backoff_cap_s": args.backoff_cap,
    }
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    if args.keepalive_interval and not args.keepalive_timeout:
        config = config.replace(keepalive_timeout_s=3 * args.keepalive_interval)
    config.validate()
    identity = load_or_create_identity(state_dir)
    anyio.run(_run_node, config, identity, args.demo_app)
    return 0


async def _run_node(config: NodeConfig, identity: object, demo_app: bool) -> None:
    import anyio

    from .node import Node

    # Catch the signals before the node listens: a SIGTERM that arrives while
    # it starts must still make it say bye, not kill it (nor SIGINT exit 130).
    # Signals during the shutdown are ignored; it ends within shutdown_grace_s.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Node(config, identity=identity) as node:  # type: ignore[arg-type]
            if demo_app:
                from .demo import install_demo_app

                install_demo_app(node)
            async for signum in signals:
                log.info("received %s: saying bye to peers", signal.Signals(signum).name)
                break


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    if args.runs < 1 or args.messages < 1:
        raise ConfigError("--runs and --messages must be at least 1")
    return run_bench(runs=args.runs, messages=args.messages, as_json=args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(duration_s=args.duration, keep=args.keep)


COMMANDS = {
    "run": cmd_run,
    "id": cmd_id,
    "keygen": cmd_keygen,
    "authorise": cmd_authorise,
    "demo": cmd_demo,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgenode`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EdgeNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
