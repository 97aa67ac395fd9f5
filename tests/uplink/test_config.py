"""UplinkConfig and its checks: every bad value names the field, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgenode.config import NodeConfig
from edgenode.errors import ConfigError
from edgenode.uplink.config import (
    MIN_SPOOL_BYTES,
    Broker,
    InMap,
    OutMap,
    UplinkConfig,
    compile_routes,
    derived_queue_caps,
    parse_broker,
)


@pytest.mark.parametrize(
    ("text", "broker"),
    [
        ("mqtt://broker.example", Broker("mqtt", "broker.example", 1883)),
        ("mqtts://broker.example", Broker("mqtts", "broker.example", 8883)),
        ("mqtt://10.0.0.5:1884", Broker("mqtt", "10.0.0.5", 1884)),
        ("mqtts://[::1]:8884/", Broker("mqtts", "::1", 8884)),
        ("  mqtt://h  ", Broker("mqtt", "h", 1883)),
    ],
)
def test_parse_broker_accepts_mqtt_and_mqtts_urls(text: str, broker: Broker) -> None:
    assert parse_broker(text) == broker


def test_broker_shows_as_a_url_with_its_port() -> None:
    assert str(parse_broker("mqtts://[::1]")) == "mqtts://[::1]:8883"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://h", "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got 'http://h'"),
        ("h:1883", "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got 'h:1883'"),
        (1883, "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got 1883"),
        (
            "mqtt://",
            "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]: missing host, got 'mqtt://'",
        ),
        (
            "mqtt://h:0",
            "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]: port should be 1..65535, got '0'",
        ),
        (
            "mqtt://h:x",
            "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]: port should be 1..65535, got 'x'",
        ),
        (
            "mqtt://h/path",
            "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] with no path, got 'mqtt://h/path'",
        ),
        (
            "mqtt://[::1",
            "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT] ([IPV6] in brackets), got 'mqtt://[::1'",
        ),
        (
            "mqtts://user:secret@h",
            "expected no user or password in the URL (use uplink.username and "
            "uplink.password_file), got mqtts://...@'h'",
        ),
    ],
)
def test_parse_broker_rejects_bad_urls(text: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_broker(text)
    assert str(info.value) == message
    assert "secret" not in str(info.value)


def good(**changes: object) -> UplinkConfig:
    return UplinkConfig(broker="mqtts://broker.example").replace(**changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"broker": "tcp://x"},
            "uplink.broker: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got 'tcp://x'",
        ),
        ({"client_id": ""}, "uplink.client_id: expected non-empty text, got ''"),
        ({"username": 5}, "uplink.username: expected non-empty text, got 5"),
        ({"password": "p"}, "uplink.password_file: expected uplink.username with a password"),
        (
            {"broker": "mqtt://x", "ca_file": Path("ca.pem")},
            "uplink.ca_file: only used with an mqtts:// broker, got 'mqtt://x'",
        ),
        (
            {"cert_file": Path("c.pem")},
            "uplink.cert_file and uplink.key_file: expected both or neither, got cert_file alone",
        ),
        (
            {"key_file": Path("k.pem")},
            "uplink.cert_file and uplink.key_file: expected both or neither, got key_file alone",
        ),
        ({"keepalive_s": 2}, "uplink.keepalive_s: expected an integer in 5..65535, got 2"),
        ({"keepalive_s": 30.0}, "uplink.keepalive_s: expected an integer in 5..65535, got 30.0"),
        ({"clean_session": "yes"}, "uplink.clean_session: expected true or false, got 'yes'"),
        ({"protocol": "3"}, "uplink.protocol: expected one of '3.1.1', '5', got '3'"),
        ({"prefix": "a/+/b"}, "uplink.prefix: expected a topic name without '+', got 'a/+/b'"),
        ({"prefix": "a/#"}, "uplink.prefix: expected a topic name without '#', got 'a/#'"),
        (
            {"prefix": "{site}/x"},
            "uplink.prefix: expected only {prefix} and {node_id} as placeholders, "
            "got '{site}' in '{site}/x'",
        ),
        (
            {"prefix": "x/{prefix}"},
            "uplink.prefix: expected no {prefix} in itself, got 'x/{prefix}'",
        ),
        (
            {"outbound": (OutMap("a", qos=2),)},
            "uplink.out[0].qos: expected 0 or 1 (MQTT QoS 2 is not offered), got 2",
        ),
        (
            {"outbound": (OutMap("a/#b"),)},
            "uplink.out[0].topic: expected '#' only as the last level ('a/#' or '#'), got 'a/#b'",
        ),
        (
            {"outbound": (OutMap("a", to="x/#"),)},
            "uplink.out[0].to: expected a topic name without '#', got 'x/#'",
        ),
        (
            {"outbound": (OutMap(""),)},
            "uplink.out[0].topic: expected a non-empty node topic, got ''",
        ),
        (
            {"outbound": (InMap("a"),)},
            "uplink.out[0]: expected a map, got InMap(topic='a', to=None, deliver='local', qos=1)",
        ),
        (
            {"inbound": (InMap("a/b#"),)},
            "uplink.in[0].topic: expected '#' only as the whole last level, got 'a/b#'",
        ),
        (
            {"inbound": (InMap("a/b+"),)},
            "uplink.in[0].topic: expected '+' only as a whole level, got 'a/b+'",
        ),
        (
            {"inbound": (InMap("a/+", to="x/#"),)},
            "uplink.in[0].to: a trailing '#' needs a filter ending in '#', "
            "got to='x/#' for topic='a/+'",
        ),
        (
            {"inbound": (InMap("a", deliver="everyone"),)},
            "uplink.in[0].deliver: expected 'local', 'site', 'peer:ADDRESS' or 'device:ID', "
            "got 'everyone'",
        ),
        (
            {"inbound": (InMap("a", deliver="peer:"),)},
            "uplink.in[0].deliver: expected 'local', 'site', 'peer:ADDRESS' or 'device:ID', "
            "got 'peer:'",
        ),
        ({"queue_messages": 0}, "uplink.queue_messages: expected an integer >= 1, got 0"),
        ({"queue_bytes": True}, "uplink.queue_bytes: expected an integer >= 1, got True"),
        (
            {"queue_policy": "drop-newest"},
            "uplink.queue_policy: expected 'drop-oldest' or 'refuse-new', got 'drop-newest'",
        ),
        (
            {"spool_bytes": 1000},
            f"uplink.spool_bytes: expected 0 (no spool) or an integer >= {MIN_SPOOL_BYTES}, "
            "got 1000",
        ),
        ({"reconnect_base_s": 0}, "uplink.reconnect_base_s: expected a finite number > 0, got 0"),
        (
            {"connect_timeout_s": float("nan")},
            "uplink.connect_timeout_s: expected a finite number > 0, got nan",
        ),
        ({"reconnect_cap_s": "soon"}, "uplink.reconnect_cap_s: expected a number > 0, got 'soon'"),
        (
            {"reconnect_base_s": 5.0, "reconnect_cap_s": 1.0},
            "uplink.reconnect_cap_s: expected at least uplink.reconnect_base_s (5.0), got 1.0",
        ),
    ],
)
def test_validate_rejects_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        good(**changes).validate()
    assert str(info.value) == message


def test_node_config_validates_its_uplink() -> None:
    config = NodeConfig(uplink=good(queue_policy="never"))
    with pytest.raises(ConfigError, match=r"^uplink\.queue_policy: expected"):
        config.validate()


def test_password_never_shows_in_repr() -> None:
    assert "hunter2" not in repr(good(username="u", password="hunter2"))


def test_derived_queue_caps_are_an_eighth_of_the_budget() -> None:
    assert derived_queue_caps(40) == (20480, 5 * 1024 * 1024)


def test_compile_routes_expands_prefix_and_node_id() -> None:
    config = good(
        prefix="fleet/site-a/{node_id}",
        outbound=(OutMap("sensors/#"), OutMap("alarm", to="fleet/alarms", qos=0)),
        inbound=(
            InMap("{prefix}/cmd/#", deliver="site"),
            InMap("fleet/all/+/config", to="config", deliver="device:esp1"),
        ),
    )
    prefix, out, inbound = compile_routes(config, "node-1")
    assert prefix == "fleet/site-a/node-1"
    assert [(r.node_pattern, r.broker_template, r.qos) for r in out] == [
        ("sensors/#", "fleet/site-a/node-1/sensors/#", 1),
        ("alarm", "fleet/alarms", 0),
    ]
    assert [(r.filter, r.node_template, r.deliver) for r in inbound] == [
        ("fleet/site-a/node-1/cmd/#", "cmd/#", "site"),
        ("fleet/all/+/config", "config", "device:esp1"),
    ]
