"""The ``edgenode`` command line.

Errors print one line, ``error: ...``, without a traceback (and never an
exception's class name). Usage and configuration errors exit 2; other
failures exit 1.
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

from .bench_options import add_bench_arguments
from .config import DEFAULT_PORT, NodeConfig, parse_address
from .errors import ConfigError, EdgeNodeError, InvalidArgument
from .settings import default_state_dir
from .version import __version__

log = logging.getLogger("edgenode")

AUTHORISED_FILE = "authorised_nodes"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    # "nan" fails the comparison; "inf" would make a timer that never fires.
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _peer_address(text: str) -> str:
    """``edgenode send``'s PEER: an IP, a node ID, or ``IP/DEVICE``."""
    from .addresses import split_address

    try:
        split_address(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _topic(text: str) -> str:
    """A topic as the node takes it: non-empty, at most the topic limit in bytes."""
    from .proto.messages import Limits

    limit = Limits().max_topic_bytes
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty topic")
    size = len(text.encode("utf-8", "surrogateescape"))
    if size > limit:
        raise argparse.ArgumentTypeError(f"topic of {size} bytes exceeds {limit}-byte limit")
    return text


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

    run = sub.add_parser(
        "run",
        help="run a node until SIGINT or SIGTERM",
        description="Run a node until SIGINT or SIGTERM. Each setting comes from the "
        "defaults, then the board profile, then the config file, then these flags "
        "(docs/configuration.md).",
    )
    with_state(run)
    run.add_argument(
        "--board",
        metavar="NAME",
        help="size the node for this board (profiles: edgenode boards)",
    )
    run.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read settings from this TOML file; flags override it",
    )
    run.add_argument(
        "--print-config",
        action="store_true",
        help="print every setting, its value and where it came from, and exit",
    )
    run.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address to listen on (default 0.0.0.0:{DEFAULT_PORT})",
    )
    run.add_argument(
        "--peer",
        action="append",
        metavar="HOST:PORT",
        help="a peer to dial and keep connected (repeatable; replaces the file's)",
    )
    run.add_argument(
        "--authorise",
        action="append",
        metavar="NODE_ID",
        help=f"also trust this node ID (repeatable; besides {AUTHORISED_FILE} in the state dir)",
    )
    run.add_argument(
        "--keepalive-interval",
        type=_positive_float,
        metavar="S",
        help="send a ping after this long without sending (default 5, or the board's)",
    )
    run.add_argument(
        "--keepalive-timeout",
        type=_positive_float,
        metavar="S",
        help="declare a peer dead after this long without a frame (default 3 intervals)",
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
        metavar="PORT[:BAUD][,dtr=on|off][,rts=on|off]",
        help="bridge the microcontroller on this UART (repeatable; default 115200 baud; "
        "DTR and RTS on at open unless the board profile says otherwise)",
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
        default=None,
        help="ask devices for reliable delivery (acks and retransmission)",
    )
    run.add_argument(
        "--discovery",
        action="store_true",
        default=None,
        help="find authorised peers on the local subnet by UDP broadcast (docs/discovery.md)",
    )
    run.add_argument(
        "--uplink",
        metavar="URL",
        help="bridge the [uplink] maps to this MQTT broker, mqtt(s)://HOST[:PORT] (docs/fleet.md)",
    )
    run.add_argument(
        "--uplink-password-file",
        type=Path,
        metavar="FILE",
        help="the MQTT password (mode 0600); the user name is uplink.username",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="one line of text per event, or one JSON object per line (default text)",
    )
    run.add_argument("--demo-app", action="store_true", help=argparse.SUPPRESS)

    sub.add_parser("boards", help="list the board profiles and what each allows")

    ident = sub.add_parser("id", help="print this node's ID")
    with_state(ident)

    keygen = sub.add_parser("keygen", help="create this node's key and certificate")
    with_state(keygen)
    keygen.add_argument("--force", action="store_true", help="replace an existing identity")

    auth = sub.add_parser("authorise", help="trust a node ID (a running node, at once)")
    revoke = sub.add_parser(
        "revoke", help="stop trusting a node ID (a running node closes its link at once)"
    )

    bench = sub.add_parser(
        "bench", help="measure this machine: node-to-node TLS, serial, a fleet of peers"
    )
    add_bench_arguments(bench)

    def with_socket(p: argparse.ArgumentParser) -> None:
        with_state(p)
        p.add_argument(
            "--socket",
            type=Path,
            default=None,
            metavar="PATH",
            help="the running node's control socket (default: control.sock in the state dir)",
        )

    for trust in (auth, revoke):
        with_socket(trust)
        trust.add_argument("node_id", metavar="NODE_ID")

    status = sub.add_parser("status", help="show the running node's peers and figures")
    with_socket(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON response")

    send = sub.add_parser("send", help="send a text message through the running node")
    with_socket(send)
    send.add_argument("peer", type=_peer_address, metavar="PEER", help="IP, node ID, or IP/DEVICE")
    send.add_argument("topic", type=_topic, metavar="TOPIC")
    send.add_argument("text", metavar="TEXT")

    watch = sub.add_parser(
        "watch",
        help="print what the running node receives on topics, until Ctrl-C",
        description="Print each message the running node receives on these topics "
        "(prefix/# or # for many): time, peer, topic and payload (text when printable, "
        "else hex). It never slows the node: it gets at most 1,000 messages a second, and "
        "when they come faster or this output falls behind, the node drops the oldest and "
        "says how many.",
    )
    with_socket(watch)
    watch.add_argument("--json", action="store_true", help="one JSON object per message")
    watch.add_argument(
        "topics",
        type=_topic,
        nargs="+",
        metavar="TOPIC",
        help="a topic to watch: exact, prefix/# or # for all (up to 8)",
    )

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


def cmd_id(args: argparse.Namespace) -> int:
    from .identity import load_identity

    print(load_identity(args.state_dir or default_state_dir()).node_id)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from .identity import IdentityExists, create_identity

    state_dir = args.state_dir or default_state_dir()
    try:
        identity = create_identity(state_dir, overwrite=args.force)
    except IdentityExists as exc:
        raise IdentityExists(
            f"state directory {state_dir} already holds {exc.what}; "
            "edgenode keygen --force replaces it (peers that authorised the old ID "
            "must then authorise the new one)",
            exc.what,
        ) from None
    print(identity.node_id)
    print(f"identity written to {state_dir}", file=sys.stderr)
    return 0


def cmd_authorise(args: argparse.Namespace) -> int:
    from .identity import parse_node_id
    from .trust import add_authorised

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
    return _tell_running_node(args, node_id, "accepts it now")


def cmd_revoke(args: argparse.Namespace) -> int:
    from .identity import parse_node_id
    from .trust import remove_authorised

    state_dir = args.state_dir or default_state_dir()
    node_id = parse_node_id(args.node_id)
    removed = remove_authorised(os.path.join(state_dir, AUTHORISED_FILE), node_id)
    print(f"{'revoked' if removed else 'not in the authorised nodes file'}: {node_id}")
    return _tell_running_node(args, node_id, "no longer trusts it", revoked=True)


def _tell_running_node(
    args: argparse.Namespace, node_id: str, effect: str, *, revoked: bool = False
) -> int:
    """Ask the node running on this state directory to re-read its trust."""
    from .control_client import NoNodeRunning, control_request, raise_for_failure

    path = _control_path(args)
    try:
        request = {"op": "reload-trust", "node_id": node_id}
        response = raise_for_failure(control_request(path, request))
    except NoNodeRunning:
        print("no node is running on this state directory: it takes effect when the node starts")
        return 0
    except EdgeNodeError as exc:
        print(
            f"error: the file is changed, but the running node was not told: {exc} "
            "(systemctl reload edgenode, or a SIGHUP, makes it re-read the file)",
            file=sys.stderr,
        )
        return 1
    if revoked and response.get("trusted"):
        print(
            f"the running node still trusts {node_id}: its configuration lists it "
            "(peers.authorised or --authorise)"
        )
        return 1
    print(f"the running node {effect}")
    return 0


def _run_settings(args: argparse.Namespace) -> dict[str, object]:
    """The settings given as ``run`` flags, keyed and converted as in a config file."""
    from .identity import parse_node_id
    from .settings import parse_serial_port, read_psk_file

    values: dict[str, object] = {}
    if args.state_dir is not None:
        values["node.state_dir"] = args.state_dir
    if args.listen is not None:
        values["node.listen"] = parse_address(args.listen)
    if args.peer is not None:
        values["peers.connect"] = [parse_address(p) for p in args.peer]
    if args.authorise is not None:
        values["peers.authorised"] = frozenset(parse_node_id(n) for n in args.authorise)
    for key, value in (
        ("keepalive.interval_s", args.keepalive_interval),
        ("keepalive.timeout_s", args.keepalive_timeout),
        ("peers.handshake_timeout_s", args.handshake_timeout),
        ("backoff.cap_s", args.backoff_cap),
        ("serial.reliable", args.serial_reliable),
        ("discovery.enabled", args.discovery),
    ):
        if value is not None:
            values[key] = value
    if args.uplink is not None:
        from .uplink.config import parse_broker

        try:
            parse_broker(args.uplink)
        except ConfigError as exc:
            raise ConfigError(f"--uplink: {exc}") from None
        values["uplink.broker"] = args.uplink.strip()
    if args.uplink_password_file is not None:
        from .settings import BY_KEY

        try:
            values["uplink.password_file"] = BY_KEY["uplink.password_file"].parse(
                str(args.uplink_password_file), None
            )
        except ConfigError as exc:
            raise ConfigError(f"--uplink-password-file: {exc}") from None
    if args.serial is not None:
        values["serial.ports"] = [parse_serial_port(spec) for spec in args.serial]
    if args.serial_psk_file is not None:
        try:
            key = read_psk_file(args.serial_psk_file)
        except ConfigError as exc:
            raise ConfigError(f"--serial-psk-file: {exc}") from None
        values["serial.psk_file"] = (args.serial_psk_file, key)
    return values


def cmd_run(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .settings import resolve

    setup_logging(args.log_level, args.log_format)
    resolved = resolve(board=args.board, config_file=args.config, command_line=_run_settings(args))
    if args.print_config:
        print(resolved.format_table())
        return 0

    import anyio

    # The node reads the state directory's authorised_nodes itself (and again
    # on SIGHUP), trusting it besides peers.authorised (edgenode.trust).
    config = resolved.config
    if config.control_socket is None:
        from .control_client import default_control_path

        config = config.replace(control_socket=default_control_path(config.state_dir))
    if resolved.board is not None:
        log.info("board %s: %s", resolved.board.name, resolved.board.description)
    identity = _identity_for_run(config.state_dir)
    anyio.run(_run_node, config, identity, args.demo_app)
    return 0


def _identity_for_run(state_dir: Path) -> object:
    """Load the node's identity, making one first if the state dir has none.

    A key is made with ``cryptography``, which costs a running node about
    11 MB of RSS for good (a module cannot be unloaded), so a first run makes
    it in a child process, exactly as ``edgenode keygen`` would.
    """
    import subprocess

    from .errors import IdentityError
    from .identity import CERT_FILENAME, KEY_FILENAME, load_identity

    state = Path(state_dir)
    if not os.path.lexists(state / KEY_FILENAME) and not os.path.lexists(state / CERT_FILENAME):
        made = subprocess.run(
            [sys.executable, "-m", "edgenode", "keygen", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            lines = made.stderr.strip().splitlines() or ["cannot make an identity"]
            raise IdentityError(lines[-1].split("error: ", 1)[-1])
        log.info("made a new identity in %s: node %s", state, made.stdout.strip())
    return load_identity(state)


def cmd_boards(args: argparse.Namespace) -> int:
    from .profiles import format_profiles, list_profiles

    print(format_profiles(list_profiles()))
    return 0


async def _run_node(config: NodeConfig, identity: object, demo_app: bool) -> None:
    import anyio

    from .node import Node

    # Catch the signals before the node listens: a SIGTERM that arrives while
    # it starts must still make it say bye, not kill it (nor SIGINT exit 130).
    # Signals during the shutdown are ignored; it ends within shutdown_grace_s.
    # SIGHUP (systemctl reload) re-reads the authorised nodes file.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with Node(config, identity=identity) as node:  # type: ignore[arg-type]
            if demo_app:
                from .demo import install_demo_app

                install_demo_app(node)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    try:
                        await node.reload_trust()
                    except ConfigError as exc:
                        log.error("SIGHUP: trust not reloaded, nothing changed: %s", exc)
                    continue
                log.info("received %s: saying bye to peers", signal.Signals(signum).name)
                break


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_from_args

    return run_from_args(args)


def _control_path(args: argparse.Namespace) -> Path:
    from .control_client import default_control_path

    return args.socket or default_control_path(args.state_dir or default_state_dir())


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from .control_client import control_request, raise_for_failure
    from .status_text import format_status

    response = raise_for_failure(control_request(_control_path(args), {"op": "status"}))
    print(json.dumps(response, indent=2) if args.json else format_status(response))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from .control_client import control_request, raise_for_failure

    request = {"op": "send", "peer": args.peer, "topic": args.topic, "text": args.text}
    raise_for_failure(control_request(_control_path(args), request))
    print("sent")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from .watch_text import run_watch

    return run_watch(_control_path(args), list(args.topics), as_json=args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(duration_s=args.duration, keep=args.keep)


COMMANDS = {
    "run": cmd_run,
    "boards": cmd_boards,
    "id": cmd_id,
    "keygen": cmd_keygen,
    "authorise": cmd_authorise,
    "revoke": cmd_revoke,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "status": cmd_status,
    "send": cmd_send,
    "watch": cmd_watch,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgenode`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, InvalidArgument) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EdgeNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        # The node refused a request that was wrong (a bad peer, topic or text):
        # a usage error, as the same mistake caught here would be.
        return 2 if getattr(exc, "is_usage_error", False) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `edgenode status | head`: the reader left. Say nothing, as other
        # tools do, and keep Python from failing again on its final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
