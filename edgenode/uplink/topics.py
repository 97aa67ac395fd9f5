"""Topic maps between the node and the broker (pure).

Two kinds of topic meet here. Node topics are any non-empty text; a node
subscription ending in ``#`` matches every topic that starts with what is
before the ``#`` (``sensors/#`` matches ``sensors/t1``). MQTT topics are
levels separated by ``/``; a topic *name* (what a message is published on)
has no ``+`` or ``#``; a topic *filter* (what a client subscribes to) may
have ``+`` for one whole level and ``#`` as the whole last level, which
also matches the level above it (``a/#`` matches ``a``). Topics starting
with ``$`` are the broker's own and match no filter starting with a
wildcard (MQTT 3.1.1 section 4.7.2).

An ``out`` route maps a node topic to a broker topic name; an ``in`` route
maps a broker topic name to a node topic. A trailing ``#`` in the target
carries over what the source's ``#`` matched, so ``sensors/#`` -> ``{prefix}/sensors/#``
sends ``sensors/t1`` to ``edgenode/ID/sensors/t1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError

#: MQTT's limit on a topic's UTF-8 length.
MAX_MQTT_TOPIC_BYTES = 65535
PLACEHOLDERS = ("{prefix}", "{node_id}")
_PLACEHOLDER_RE = re.compile(r"\{[^{}]*\}")


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty {what}, got {value!r:.60}")
    if "\x00" in value:
        raise ConfigError(f"expected a {what} without NUL characters, got {value!r:.60}")
    return value


def _check_placeholders(value: str) -> None:
    for found in _PLACEHOLDER_RE.findall(value):
        if found not in PLACEHOLDERS:
            raise ConfigError(
                f"expected only {' and '.join(PLACEHOLDERS)} as placeholders, "
                f"got {found!r:.40} in {value!r:.60}"
            )


def _trailing_hash_only(value: str) -> bool:
    """``#`` appears at most once, as the whole last level."""
    if "#" not in value:
        return True
    return value.count("#") == 1 and (value == "#" or value.endswith("/#"))


def check_node_pattern(value: object) -> str:
    """A node topic or subscription pattern for a map: ``#`` only as ``#`` or a trailing ``/#``."""
    text = _check_text(value, "node topic")
    if not _trailing_hash_only(text):
        raise ConfigError(f"expected '#' only as the last level ('a/#' or '#'), got {text!r:.60}")
    return text


def check_template(value: object, carries: bool) -> str:
    """A broker topic name template; ``carries``: it may end in ``/#`` (or be ``#``)."""
    text = _check_text(value, "broker topic")
    _check_placeholders(text)
    if "+" in text:
        raise ConfigError(f"expected a topic name without '+', got {text!r:.60}")
    if "#" in text and not carries:
        raise ConfigError(f"expected a topic name without '#', got {text!r:.60}")
    if not _trailing_hash_only(text):
        raise ConfigError(
            "expected '#' only as a trailing '/#' (carrying the node topic's '#'), "
            f"got {text!r:.60}"
        )
    return text


def check_filter(value: object) -> str:
    """An MQTT topic filter (placeholders allowed): ``+`` whole levels, ``#`` the last."""
    text = _check_text(value, "topic filter")
    _check_placeholders(text)
    levels = text.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ConfigError(f"expected '#' only as the whole last level, got {text!r:.60}")
        if "+" in level and level != "+":
            raise ConfigError(f"expected '+' only as a whole level, got {text!r:.60}")
    return text


def is_topic_name(name: str) -> bool:
    """Whether ``name`` may be published on: non-empty, no wildcard, no NUL, <= 65535 bytes."""
    if not name or "+" in name or "#" in name or "\x00" in name:
        return False
    return len(name.encode("utf-8", "surrogatepass")) <= MAX_MQTT_TOPIC_BYTES


def topic_matches(filter_: str, name: str) -> bool:
    """Whether the topic ``name`` matches the MQTT ``filter_``."""
    if name.startswith("$") and filter_[:1] in ("+", "#"):
        return False
    f_levels = filter_.split("/")
    n_levels = name.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(n_levels):
            return False
        if level != "+" and level != n_levels[i]:
            return False
    return len(f_levels) == len(n_levels)


@dataclass(frozen=True)
class OutRoute:
    """A compiled ``out`` map: which node topics, and the broker topic for each."""

    node_pattern: str
    broker_template: str
    qos: int

    @property
    def carries(self) -> bool:
        return self.node_pattern.endswith("#")

    def matches(self, node_topic: str) -> bool:
        if self.carries:
            return node_topic.startswith(self.node_pattern[:-1])
        return node_topic == self.node_pattern

    def broker_topic(self, node_topic: str) -> str | None:
        """The broker topic for ``node_topic``, or None when it makes no valid MQTT name."""
        target = self.broker_template
        if target.endswith("#"):
            suffix = node_topic[len(self.node_pattern) - 1 :] if self.carries else ""
            target = target[:-1] + suffix
        return target if is_topic_name(target) else None


@dataclass(frozen=True)
class InRoute:
    """A compiled ``in`` map: which broker topics, and the node topic for each."""

    filter: str
    node_template: str
    deliver: str
    qos: int

    def matches(self, broker_topic: str) -> bool:
        return topic_matches(self.filter, broker_topic)

    def node_topic(self, broker_topic: str) -> str | None:
        """The node topic for a matching ``broker_topic``, or None when it would be empty."""
        target = self.node_template
        if not target.endswith("#"):
            return target
        fixed = len(self.filter.split("/")) - 1  # the levels before the filter's '#'
        suffix = "/".join(broker_topic.split("/")[fixed:])
        if suffix:
            return target[:-1] + suffix
        # 'a/#' also matches 'a': its node topic is the template's parent level.
        parent = target[:-2]
        return parent or None


def first_match(routes: tuple[InRoute, ...], broker_topic: str) -> InRoute | None:
    """The first route whose filter matches (the configuration's order decides)."""
    for route in routes:
        if route.matches(broker_topic):
            return route
    return None
