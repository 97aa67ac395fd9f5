"""Topic maps and MQTT topic matching, cross-checked with paho-mqtt's own matcher."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from edgenode.errors import ConfigError
from edgenode.uplink.topics import (
    InRoute,
    OutRoute,
    check_filter,
    check_template,
    first_match,
    is_topic_name,
    topic_matches,
)


@pytest.mark.parametrize(
    ("filter_", "name", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "/x", True),
        ("+", "$SYS", False),
        ("#", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("a/+/c", "a//c", True),
    ],
)
def test_topic_matches_follows_mqtt(filter_: str, name: str, expected: bool) -> None:
    assert topic_matches(filter_, name) is expected
    assert topic_matches_sub(filter_, name) is expected


_level = st.sampled_from(["a", "b", "", "$x", "ab"])
_names = st.lists(_level, min_size=1, max_size=4).map("/".join).filter(bool)
_filters = st.lists(st.sampled_from(["a", "b", "", "+", "$x"]), min_size=1, max_size=4).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join([*levels, "#"])])
)


@given(_filters, _names)
def test_topic_matches_agrees_with_paho(filter_: str, name: str) -> None:
    assert topic_matches(filter_, name) == topic_matches_sub(filter_, name)


def test_out_route_carries_what_the_hash_matched() -> None:
    route = OutRoute("sensors/#", "site/sensors/#", 1)
    assert route.matches("sensors/t1/x") and not route.matches("sensor")
    assert route.broker_topic("sensors/t1/x") == "site/sensors/t1/x"
    assert route.broker_topic("sensors/") == "site/sensors/"
    assert OutRoute("#", "site/#", 1).broker_topic("a b/c") == "site/a b/c"
    assert OutRoute("sensors/#", "all-sensors", 1).broker_topic("sensors/t1") == "all-sensors"
    assert OutRoute("alarm", "site/alarm", 0).broker_topic("alarm") == "site/alarm"


@pytest.mark.parametrize("node_topic", ["sensors/a+b", "sensors/#", "sensors/nul\x00"])
def test_out_route_gives_none_for_topics_mqtt_cannot_carry(node_topic: str) -> None:
    assert OutRoute("sensors/#", "site/sensors/#", 1).broker_topic(node_topic) is None


def test_in_route_maps_the_rest_of_the_filter() -> None:
    route = InRoute("site/+/cmd/#", "cmd/#", "local", 1)
    assert route.matches("site/a/cmd/reboot/now")
    assert route.node_topic("site/a/cmd/reboot/now") == "cmd/reboot/now"
    assert route.node_topic("site/a/cmd") == "cmd"  # 'a/#' also matches 'a'
    assert InRoute("#", "#", "local", 1).node_topic("x/y") == "x/y"
    assert InRoute("a/#", "#", "local", 1).node_topic("a") is None
    assert InRoute("a/+", "fixed", "local", 1).node_topic("a/b") == "fixed"


def test_first_match_takes_the_first_map_in_order() -> None:
    routes = (
        InRoute("a/b", "first", "local", 1),
        InRoute("a/#", "second", "local", 1),
    )
    assert first_match(routes, "a/b").node_template == "first"  # type: ignore[union-attr]
    assert first_match(routes, "a/c").node_template == "second"  # type: ignore[union-attr]
    assert first_match(routes, "b") is None


def test_is_topic_name() -> None:
    assert is_topic_name("a/b") and is_topic_name("/")
    assert not is_topic_name("") and not is_topic_name("a/+") and not is_topic_name("#")
    assert not is_topic_name("x" * 65536)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a/#/b", "expected '#' only as the whole last level, got 'a/#/b'"),
        ("a+", "expected '+' only as a whole level, got 'a+'"),
        ("", "expected a non-empty topic filter, got ''"),
        (None, "expected a non-empty topic filter, got None"),
        ("a\x00", "expected a topic filter without NUL characters, got 'a\\x00'"),
    ],
)
def test_check_filter_rejects(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_filter(value)
    assert str(info.value) == message


def test_check_template_allows_a_trailing_hash_only_when_it_carries() -> None:
    assert check_template("x/#", True) == "x/#"
    with pytest.raises(ConfigError) as info:
        check_template("x/#/y", True)
    assert str(info.value) == (
        "expected '#' only as a trailing '/#' (carrying the node topic's '#'), got 'x/#/y'"
    )
