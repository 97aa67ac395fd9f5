"""One connection to the broker: paho-mqtt's client, driven by the node's event loop.

paho-mqtt (2.x) codes MQTT 3.1.1 and 5; this module gives it a socket and
calls it when that socket is ready, as the serial transport does with a
serial port: ``loop_read()`` when ``anyio.wait_readable()`` returns,
``loop_write()`` when paho has bytes to send (its write-registration
callback) and the socket is writable, ``loop_misc()`` (keepalive) every
quarter of a keepalive interval. No paho thread (``loop_start``), no inner
``select``.

One thing paho cannot do without blocking: opening the connection
(``reconnect()`` resolves the name, connects TCP and completes the TLS
handshake on a blocking socket, each step bounded by ``connect_timeout``,
then sends CONNECT). That one call runs in a worker thread; the CONNACK and
everything after it are read in the loop. Each connection gets a new paho
client, so nothing of a lost connection's state leaks into the next: what
was in flight is the queue's business (:mod:`.queue`).

Inbound messages are acknowledged by the uplink once delivered to the
node (paho's ``manual_ack``), and the reader stops reading while the
uplink's inbound buffer is full: TCP carries the pressure to the broker.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable
from typing import Any, Callable

import anyio
import anyio.lowlevel
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..tls import ssl_reason
from .config import Broker, UplinkConfig
from .errors import BrokerRefused, BrokerUnavailable, BrokerUntrusted, UplinkError

log = logging.getLogger("edgenode.uplink")

#: Messages published and not yet acknowledged, at most (paho's own window too).
MAX_INFLIGHT = 32
#: What the node tells an MQTT 5 broker about its session when it is persistent:
#: kept for ever, as MQTT 3.1.1's persistent sessions are.
_SESSION_NEVER_EXPIRES = 0xFFFFFFFF
#: Headroom over the node's frame limit for an MQTT 5 packet's own header.
_PACKET_HEADROOM = 1024


def tls_context(config: UplinkConfig) -> ssl.SSLContext:
    """The TLS context for an ``mqtts://`` broker: verify its certificate and
    name against ``ca_file`` (or the system's CAs), present ours if configured.

    Raises :class:`BrokerUntrusted` for a file that cannot be read or used.
    """
    try:
        ctx = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file is not None else None
        )
        if config.cert_file is not None:
            ctx.load_cert_chain(str(config.cert_file), str(config.key_file))
    except ssl.SSLError as exc:
        raise BrokerUntrusted(f"cannot use the uplink's tls files: {ssl_reason(exc)}") from None
    except OSError as exc:
        name = exc.filename or config.ca_file
        raise BrokerUntrusted(f"cannot read tls file {name}: {exc.strerror or exc}") from None
    return ctx


def describe_connect_error(broker: Broker, exc: BaseException) -> UplinkError:
    """One line for why opening a connection to ``broker`` failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or ssl_reason(exc)).lower()
        return BrokerUntrusted(f"broker {broker}: certificate not trusted: {detail}")
    if isinstance(exc, ssl.CertificateError):
        return BrokerUntrusted(f"broker {broker}: certificate not trusted: {exc}")
    if isinstance(exc, ssl.SSLError):
        return BrokerUntrusted(f"broker {broker}: tls failed: {ssl_reason(exc)}")
    if isinstance(exc, socket.gaierror):
        return BrokerUnavailable(f"broker {broker}: cannot resolve {broker.host}: {exc.strerror}")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        what = str(exc) or "timed out"
        return BrokerUnavailable(f"broker {broker}: {what.lower()}")
    if isinstance(exc, OSError):
        return BrokerUnavailable(f"broker {broker}: cannot connect: {exc.strerror or exc}")
    return BrokerUnavailable(f"broker {broker}: cannot connect: {exc or type(exc).__name__}")


class Session:
    """One broker connection: a fresh paho client and the tasks that drive it.

    ``sink`` receives what the connection produces, from the loop:
    ``published(mid, failure)`` (acknowledged, or at QoS 0 written; failure
    is an MQTT 5 reason text or None), ``message(session, topic, payload,
    qos, mid)`` and ``subscribed(failures)``. ``room()`` is awaited before
    each read (inbound backpressure).
    """

    def __init__(
        self,
        config: UplinkConfig,
        *,
        client_id: str,
        will_topic: str,
        max_packet_bytes: int,
        sink: Any,
        room: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.broker = config.parsed_broker
        self.sink = sink
        self._room = room
        self.v5 = config.protocol == "5"
        self._max_packet_bytes = max_packet_bytes + _PACKET_HEADROOM
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if self.v5 else config.clean_session,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        self.client.max_queued_messages_set(0)
        self.client.connect_timeout = config.connect_timeout_s
        if config.username is not None:
            self.client.username_pw_set(config.username, config.password)
        self.client.will_set(will_topic, b"offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_socket_open = self._on_socket_open
        self.client.on_disconnect = self._on_disconnect
        self.connected = anyio.Event()
        #: Set once :meth:`run` has returned.
        self.ended = anyio.Event()
        self._closing = False
        #: Why the connection ended (the first reason wins), once it has.
        self.error: UplinkError | None = None
        self._sock: Any = None
        self._scope: anyio.CancelScope | None = None
        self._write_wanted = anyio.Event()

    # -- opening ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect TCP (and TLS) and send CONNECT; raise an :class:`UplinkError`.

        The blocking part runs in a worker thread; a cancelled open leaves it
        to end by itself within paho's ``connect_timeout``.
        """
        if self.broker.tls:
            self.client.tls_set_context(tls_context(self.config))
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.MaximumPacketSize = self._max_packet_bytes
            properties.SessionExpiryInterval = (
                0 if self.config.clean_session else _SESSION_NEVER_EXPIRES
            )
        self.client.connect_async(
            self.broker.host,
            self.broker.port,
            keepalive=self.config.keepalive_s,
            clean_start=self.config.clean_session if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        try:
            await anyio.to_thread.run_sync(self.client.reconnect, abandon_on_cancel=True)
        except Exception as exc:  # whatever the thread raised, as one line
            self.abort()
            raise describe_connect_error(self.broker, exc) from None
        # From here on, paho asks the loop to write instead of writing itself.
        self.client.on_socket_register_write = self._on_register_write

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        self._sock = sock  # in the worker thread: a plain assignment

    # -- running ---------------------------------------------------------------------

    async def run(self) -> UplinkError:
        """Drive the connection until it ends; return why (never raises it)."""
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if self.error is None:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._read)
                        tg.start_soon(self._write)
                        tg.start_soon(self._misc)
        finally:
            self.abort()
            self.ended.set()
        return self.error or BrokerUnavailable(f"broker {self.broker}: connection closed")

    def fail(self, error: UplinkError) -> None:
        """End the connection with ``error`` (the first reason is kept)."""
        if self.error is None:
            self.error = error
        if self._scope is not None:
            self._scope.cancel()

    def abort(self) -> None:
        """Close the socket without a DISCONNECT: the broker publishes our will."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _lost(self, rc: int, doing: str) -> None:
        if rc == MQTTErrorCode.MQTT_ERR_KEEPALIVE:
            what = f"no answer to a keepalive ping within {self.config.keepalive_s} s"
        elif rc == MQTTErrorCode.MQTT_ERR_CONN_LOST:
            what = "connection lost (closed or reset by the broker)"
        else:
            what = f"{doing} failed: {mqtt.error_string(rc).lower().rstrip('.')}"
        self.fail(BrokerUnavailable(f"broker {self.broker}: {what}"))

    def _gone(self) -> bool:
        """Whether the connection ended (paho closes its socket when it sees a loss)."""
        if self.error is None and self.client.socket() is None:
            self._lost(MQTTErrorCode.MQTT_ERR_CONN_LOST, "reading")
        return self.error is not None

    async def _read(self) -> None:
        sock = self._sock
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted
        while self.error is None:
            await self._room()
            if self._gone():
                return
            if pending is not None and pending():
                await anyio.lowlevel.checkpoint()
            else:
                await anyio.wait_readable(sock)
            rc = self.client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._lost(rc, "reading")
                return

    async def _write(self) -> None:
        sock = self._sock
        while self.error is None:
            if self._gone():
                return
            if self.client.want_write():
                await anyio.wait_writable(sock)
                rc = self.client.loop_write()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._lost(rc, "writing")
                    return
            else:
                self._write_wanted = anyio.Event()
                if not self.client.want_write():
                    await self._write_wanted.wait()

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._write_wanted.set()

    async def _misc(self) -> None:
        interval_s = max(0.25, self.config.keepalive_s / 4)
        while self.error is None:
            await anyio.sleep(interval_s)
            rc = self.client.loop_misc()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                # loop_misc closes the connection only when a ping went unanswered.
                self._lost(MQTTErrorCode.MQTT_ERR_KEEPALIVE, "keepalive")
                return

    # -- paho's callbacks (in the loop, inside loop_read/loop_write) --------------------

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            hint = ""
            if reason.value in (4, 5, 0x86, 0x87):  # bad user name or password, not authorised
                hint = " (check uplink.username and uplink.password_file)"
            elif reason.value in (2, 0x85):  # identifier rejected
                hint = " (check uplink.client_id)"
            self.fail(
                BrokerRefused(
                    f"broker {self.broker} refused the connection: {str(reason).lower()}{hint}"
                )
            )
            return
        self.connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self._closing:
            self.fail(UplinkError("uplink closed"))
        elif flags.is_disconnect_packet_from_server:
            self.fail(
                BrokerUnavailable(f"broker {self.broker} disconnected us: {str(reason).lower()}")
            )
        # Otherwise the task that saw the loss reports it, with its reason.

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        failure = str(reason).lower() if reason is not None and reason.is_failure else None
        self.sink.published(mid, failure)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = None  # paho decodes the topic as UTF-8; the spec requires it
        self.sink.message(self, topic, message.payload, message.qos, message.mid)

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        self.sink.subscribed([str(r).lower() for r in reasons if r.is_failure])

    # -- what the uplink asks --------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> int:
        """Hand a message to paho (the writer sends it); return its message ID."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_QUEUE_SIZE):
            self.fail(
                BrokerUnavailable(
                    f"broker {self.broker}: publish failed: {mqtt.error_string(info.rc).lower()}"
                )
            )
        return int(info.mid)

    def subscribe(self, filters: list[tuple[str, int]]) -> None:
        if filters:
            self.client.subscribe(filters)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge an inbound QoS 1 message (after it was delivered)."""
        if self.error is None and qos:
            self.client.ack(mid, qos)

    def disconnect(self) -> None:
        """Send DISCONNECT (the broker then drops our will); :attr:`ended` is
        set once it has left and the connection is closed."""
        if self.error is not None or self._sock is None:
            self.fail(UplinkError("uplink closed"))
            return
        self._closing = True
        self.client.disconnect()
