"""A node's parts, built from its settings and wired to each other.

This is the node's wiring diagram (docs/architecture.md, "The loop" and
"Who owns what"): the registry and the keepalive scheduler, the
dispatcher's inbox, the subscriptions and requests, peer learning, device
routing, names, the dispatcher, the API's way to an outbox, the data path
and the handshakes, and the optional parts built at construction (the
serial bridge, systemd's notify socket). Each part gets what it may use of
the others, as callables where the other is built later, and nothing here
runs: :class:`edgenode.node.Node` starts the tasks and offers the API.

What the parts need of the running node (its task group, whether it is
closing, the end of its last connection) comes in as callables, so this
module never imports the node.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .addresses import LOCAL
from .config import NodeConfig
from .connection import Connection
from .datapath import DataPath
from .devices import DeviceRouter
from .dispatcher import Dispatcher
from .handshake import Handshakes
from .identity import Identity
from .inbox import Inbox
from .ips import normalise_ip
from .keepalive import Keepalive
from .learning import PeerLearning
from .names import PeerNames
from .proto.messages import Limits
from .refusals import RefusalLog
from .registry import Registry
from .requests import Requests
from .sending import Sending
from .subscriptions import EventFeed, Subscriptions
from .tls import client_context
from .trust import Trust

if TYPE_CHECKING:
    from .bridge import SerialBridge
    from .systemd import SystemdNotifier

monotonic = time.monotonic

_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
#: Pings due within this share of an interval go out together: one wake-up
#: for many idle peers.
_PING_SLACK = 0.05


class Parts:
    """The parts of one node, built and wired; ``Node`` holds each of them.

    ``spawn`` starts a task in the node's task group (or nothing once it
    has closed), ``task_group`` returns that group (None before start and
    after the end), ``is_closing`` says whether the node is closing or not
    running, and ``on_all_closed`` is called once every connection has
    closed after a shutdown. Raises :class:`ConfigError` for a bad
    ``$NOTIFY_SOCKET`` or ``$WATCHDOG_USEC`` (edgenode.systemd).
    """

    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        trust: Trust,
        epoch: int,
        *,
        spawn: Callable[..., None],
        task_group: Callable[[], Any],
        is_closing: Callable[[], bool],
        on_all_closed: Callable[[], None],
    ) -> None:
        node_id = identity.node_id
        self._spawn = spawn
        #: Listening on every address (0.0.0.0, ::): our IP is the one each peer sees.
        self.wildcard = config.listen_host in _WILDCARD_HOSTS
        our_ip = "0.0.0.0" if self.wildcard else normalise_ip(config.listen_host)
        self.limits = Limits(max_frame_bytes=config.max_frame_bytes)
        self.registry = Registry(
            our_ip,
            max_peers=config.max_peers,
            prune_after_s=config.prune_after_s,
            # Each side's handshake ends within its timeout: two of them bound
            # how far apart the two halves of a simultaneous open can be.
            simultaneous_window_s=2 * config.handshake_timeout_s,
        )
        self.keepalive = Keepalive(
            interval_s=config.keepalive_interval_s,
            timeout_s=config.keepalive_timeout_s,
            rand=random.random,
            jitter=config.keepalive_jitter,
            backoff_base_s=config.backoff_base_s,
            backoff_cap_s=config.backoff_cap_s,
            ping_slack_s=config.keepalive_interval_s * _PING_SLACK,
        )
        self.inbox = Inbox(config.inbox_size)
        #: Refused connections and failed inbound handshakes: exact counts, and
        #: the ration of log lines about them (edgenode.refusals).
        self.refusals = RefusalLog()
        self.subscriptions = Subscriptions(stall_timeout_s=config.subscriber_stall_timeout_s)
        self.events = EventFeed()
        self.requests = Requests(
            max_pending=config.max_pending_requests,
            max_inflight=config.max_inflight_handlers,
            handler_timeout_s=config.handler_timeout_s,
            traffic=self._traffic,
        )
        self.learning = PeerLearning(
            node_id=node_id,
            registry=self.registry,
            keepalive=self.keepalive,
            is_authorised=trust.allows,
            learn_from_peers=config.learn_peers,
            state_dir=config.state_dir if config.remember_peers else None,
            max_known_peers=config.max_known_peers,
        )
        self.devices = DeviceRouter(
            node_id=node_id,
            address=self.address,
            registry=self.registry,
            subscriptions=self.subscriptions,
            events=self.events,
            requests=self.requests,
            inbox=self.inbox,
            queue_to_peers=lambda frame, droppable: self.dispatcher.queue_to_peers(
                frame, droppable
            ),
            schedule=lambda when, callback: self.dispatcher.schedule(when, callback),
            task_group=task_group,
        )
        self.names = PeerNames(
            registry=self.registry,
            keepalive=self.keepalive,
            spawn=spawn,
            post=self.inbox.post,
            timeout_s=2 * config.handshake_timeout_s,
            prefer_family=socket.AF_INET6 if ":" in our_ip else socket.AF_INET,
            our_ip=lambda: self.registry.our_ip,
        )
        self.dispatcher = Dispatcher(
            config=config,
            registry=self.registry,
            keepalive=self.keepalive,
            inbox=self.inbox,
            events=self.events,
            requests=self.requests,
            learning=self.learning,
            devices=self.devices,
            start_dial=self._start_dial,
            spawn=spawn,
            wildcard=self.wildcard,
            max_peers_listed=self.limits.max_peers_listed,
            refusals=self.refusals,
            names=self.names,
            is_authorised=trust.allows,
        )
        self.devices.on_up = self.dispatcher.wake
        self.sending = Sending(
            limits=self.limits,
            registry=self.registry,
            keepalive=self.keepalive,
            dispatcher=self.dispatcher,
            devices=self.devices,
            address=self.address,
            is_closing=is_closing,
            settle_wait_s=config.handshake_timeout_s,
        )
        self.devices.sending = self.sending
        self.datapath = DataPath(
            subscriptions=self.subscriptions,
            requests=self.requests,
            inbox=self.inbox,
            keepalive=self.keepalive,
            devices=self.devices,
            on_all_closed=on_all_closed,
        )
        self.dispatcher.on_all_closed = on_all_closed
        self.dispatcher.open_connections = lambda: self.datapath.open_connections
        self.handshakes = Handshakes(
            config=config,
            identity=identity,
            is_authorised=trust.allows,
            limits=self.limits,
            epoch=epoch,
            inbox=self.inbox,
            run_connection=self.datapath.run,
            client_context=client_context(identity),
            refusals=self.refusals,
            awaits_sign_of_life=self.dispatcher.dials.awaits_sign_of_life,
        )
        self.bridge: SerialBridge | None = None
        if config.serial_ports:
            from .bridge import SerialBridge  # pyserial and the link load only when needed

            self.bridge = SerialBridge(self.devices, config, node_id, self.inbox.post)
            self.devices.bridge = self.bridge
            for event_type, handler in self.bridge.handlers().items():
                self.dispatcher.register(event_type, handler)
        #: systemd's notify socket, under a Type=notify unit (edgenode.systemd,
        #: loaded only then; a bad $NOTIFY_SOCKET or $WATCHDOG_USEC raises
        #: ConfigError here, before anything starts).
        self.systemd: SystemdNotifier | None = None
        if os.environ.get("NOTIFY_SOCKET"):
            from .systemd import SystemdNotifier

            self.systemd = SystemdNotifier.from_environ(
                os.environ, pid=os.getpid(), max_lag_s=config.keepalive_timeout_s
            )

    def address(self) -> str:
        """This node's IP as its devices are addressed (``local`` on a wildcard listener)."""
        return LOCAL if self.wildcard else self.registry.our_ip

    def _start_dial(self, ip: str, port: int) -> None:
        self._spawn(self.handshakes.dial, ip, port)

    def _traffic(self, conn: Connection) -> None:
        self.keepalive.sent(conn.ip, monotonic())
