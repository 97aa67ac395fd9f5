"""Tests of the IP-keyed peer registry and its admission rules (pure, simulated time)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from edgenode.errors import ConfigError, InvalidAddress
from edgenode.ips import ip_sort_key, normalise_ip
from edgenode.registry import (
    DOWN,
    INBOUND,
    OUTBOUND,
    UP,
    Admission,
    PeerEntry,
    Registry,
)

OURS = "127.0.0.2"
PEER = "127.0.0.3"
NODE_A = "node-a"
NODE_B = "node-b"

_conn_numbers = itertools.count(1)


class Conn:
    """A stand-in for the node's connection handle: compared by identity."""

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name or f"conn{next(_conn_numbers)}"

    def __repr__(self) -> str:
        return f"<Conn {self.name}>"


def make_registry(our_ip: str = OURS, max_peers: int = 8, prune_after_s: float = 60.0) -> Registry:
    return Registry(our_ip, max_peers=max_peers, prune_after_s=prune_after_s)


def admit(
    registry: Registry,
    conn: Conn,
    ip: str = PEER,
    node_id: str = NODE_A,
    epoch: int = 1,
    direction: str = INBOUND,
    listen_port: int | None = 7000,
    now: float = 0.0,
) -> Admission:
    return registry.admit(conn, ip, node_id, epoch, direction, listen_port, now)


# -- addresses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("::ffff:127.0.0.2", "127.0.0.2"),
        ("::FFFF:7F00:2", "127.0.0.2"),
        ("[::ffff:10.1.2.3]", "10.1.2.3"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[fe80::1%wlan0]", "fe80::1"),
        (" 10.0.0.1 ", "10.0.0.1"),
        ("::1", "::1"),
    ],
)
def test_normalise_ip(text: str, expected: str) -> None:
    assert normalise_ip(text) == expected


@pytest.mark.parametrize(
    "text", ["x", "", "127.0.0", "127.0.0.256", "127.0.0.1:7000", "10.0.0.1%eth0", "::g"]
)
def test_normalise_ip_rejects_invalid_address(text: str) -> None:
    with pytest.raises(InvalidAddress) as raised:
        normalise_ip(text)
    assert str(raised.value) == f"invalid ip address {text!r}"


def test_normalise_ip_rejects_invalid_address_with_exact_message() -> None:
    with pytest.raises(InvalidAddress, match=r"^invalid ip address 'x'$"):
        normalise_ip("x")


def test_normalise_ip_rejects_long_garbage_with_truncated_message() -> None:
    with pytest.raises(InvalidAddress) as raised:
        normalise_ip("a" * 1000)
    message = str(raised.value)
    assert message.startswith("invalid ip address 'aaaa")
    assert message.endswith("...")
    assert len(message) < 100


def test_normalise_ip_rejects_non_string() -> None:
    with pytest.raises(InvalidAddress, match=r"^invalid ip address 5$"):
        normalise_ip(5)  # type: ignore[arg-type]


def test_ip_sort_key_is_numeric_and_orders_v4_before_v6() -> None:
    assert ip_sort_key("127.0.0.10") > ip_sort_key("127.0.0.9")
    assert ip_sort_key("::ffff:127.0.0.2") == ip_sort_key("127.0.0.2") == (4, 0x7F000002)
    assert ip_sort_key("255.255.255.255") < ip_sort_key("::")
    ips = ["::2", "10.0.0.1", "::1", "9.255.255.255", "2001:db8::1"]
    assert sorted(ips, key=ip_sort_key) == [
        "9.255.255.255",
        "10.0.0.1",
        "::1",
        "::2",
        "2001:db8::1",
    ]


def test_ip_sort_key_rejects_invalid_address() -> None:
    with pytest.raises(InvalidAddress, match=r"^invalid ip address 'nope'$"):
        ip_sort_key("nope")


# -- construction ------------------------------------------------------------


def test_registry_normalises_our_ip() -> None:
    assert make_registry("::ffff:127.0.0.2").our_ip == "127.0.0.2"


def test_registry_rejects_invalid_our_ip() -> None:
    with pytest.raises(ConfigError, match=r"^our address: invalid ip address 'here'$"):
        make_registry("here")


@pytest.mark.parametrize("max_peers", [0, -1, 2.5, True])
def test_registry_rejects_bad_max_peers(max_peers: object) -> None:
    with pytest.raises(ConfigError) as raised:
        Registry(OURS, max_peers=max_peers, prune_after_s=1.0)  # type: ignore[arg-type]
    assert str(raised.value) == f"max_peers must be an integer >= 1, got {max_peers!r}"


@pytest.mark.parametrize("prune_after_s", [-1.0, float("nan")])
def test_registry_rejects_bad_prune_after(prune_after_s: float) -> None:
    with pytest.raises(ConfigError) as raised:
        Registry(OURS, max_peers=4, prune_after_s=prune_after_s)
    assert str(raised.value) == f"prune_after_s must be >= 0, got {prune_after_s!r}"


# -- admission rules -------------------------------------------------------------


def test_admit_refuses_our_own_address() -> None:
    registry = make_registry()
    for spelling in (OURS, "::ffff:127.0.0.2"):
        admission = admit(registry, Conn(), ip=spelling)
        assert not admission.accepted
        assert admission.reason == "connection from our own address 127.0.0.2"
        assert admission.replaced is None
        assert admission.entry is None
    assert len(registry) == 0


def test_admit_new_ip_creates_up_entry() -> None:
    registry = make_registry()
    conn = Conn()
    admission = admit(registry, conn, ip="::ffff:127.0.0.3", epoch=7, direction=OUTBOUND, now=3.0)
    assert admission.accepted
    assert admission.reason is None
    assert admission.replaced is None
    assert admission.replaced_reason is None
    entry = admission.entry
    assert entry is not None
    assert entry is registry.get(PEER)
    assert (entry.ip, entry.node_id, entry.epoch, entry.state) == (PEER, NODE_A, 7, UP)
    assert entry.conn is conn
    assert entry.direction == OUTBOUND
    assert entry.listen_port == 7000
    assert entry.configured is False
    assert entry.up_since == 3.0
    assert entry.last_change == 3.0
    assert entry.down_reason is None
    assert entry.times_up == 1
    assert registry.by_conn(conn) is entry
    assert registry.by_node_id(NODE_A) is entry
    assert registry.up() == [entry]


def test_admit_refuses_new_ip_when_table_full() -> None:
    registry = make_registry(max_peers=2)
    admit(registry, Conn(), ip="10.0.0.1", node_id="n1")
    admit(registry, Conn(), ip="10.0.0.2", node_id="n2")
    admission = admit(registry, Conn(), ip="10.0.0.3", node_id="n3")
    assert not admission.accepted
    assert admission.reason == "peer table full (2 entries)"
    assert admission.entry is None
    assert len(registry) == 2
    assert "10.0.0.3" not in registry


def test_admit_prunes_full_table_first() -> None:
    registry = make_registry(max_peers=2, prune_after_s=60.0)
    old = Conn()
    admit(registry, old, ip="10.0.0.1", node_id="n1", now=0.0)
    admit(registry, Conn(), ip="10.0.0.2", node_id="n2", now=0.0)
    registry.closed(old, "eof", now=10.0)
    # Down, but not for long enough: still full.
    assert not admit(registry, Conn(), ip="10.0.0.3", node_id="n3", now=69.0).accepted
    assert registry.take_pruned() == []
    admission = admit(registry, Conn(), ip="10.0.0.3", node_id="n3", now=70.0)
    assert admission.accepted
    assert "10.0.0.1" not in registry
    assert [entry.ip for entry in registry.take_pruned()] == ["10.0.0.1"]
    assert registry.take_pruned() == []
    assert registry.by_node_id("n1") is None


def test_hints_cannot_keep_verified_peers_out() -> None:
    # Regression: beacons forged from many source addresses (with an
    # authorised node ID) filled the table with learned entries that were
    # never connected, and real peers were refused until the prune delay.
    registry = make_registry(max_peers=3, prune_after_s=3600.0)
    proven = Conn()
    admit(registry, proven, ip="10.0.0.1", node_id="n1", now=0.0)
    registry.closed(proven, "eof", now=1.0)  # down, but it was connected once
    assert registry.learn("10.0.9.1", 7000, "forged", now=2.0) is not None
    assert registry.learn("10.0.9.2", 7000, "forged", now=3.0) is not None
    assert registry.learn("10.0.9.3", 7000, "forged", now=4.0) is None  # hints never evict
    admission = admit(registry, Conn(), ip="10.0.0.2", node_id="n2", now=5.0)
    assert admission.accepted
    assert [entry.ip for entry in registry.take_pruned()] == ["10.0.9.1"]  # the oldest hint
    entry = registry.add_configured("10.0.0.3", 7000, now=6.0)
    assert entry.configured
    assert [entry.ip for entry in registry.take_pruned()] == ["10.0.9.2"]
    assert sorted(entry.ip for entry in registry) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    # Nothing left to evict: proven and configured entries stay.
    admission = admit(registry, Conn(), ip="10.0.0.4", node_id="n4", now=7.0)
    assert not admission.accepted
    assert admission.reason == "peer table full (3 entries)"
    assert registry.by_node_id("forged") is None


def test_admit_down_entry_accepts_and_records_new_node_id() -> None:
    registry = make_registry()
    first = Conn()
    admit(registry, first, node_id=NODE_A, epoch=1, now=0.0)
    registry.closed(first, "eof", now=5.0)
    second = Conn()
    admission = admit(registry, second, node_id=NODE_B, epoch=1, now=6.0)
    assert admission.accepted
    assert admission.replaced is None
    entry = admission.entry
    assert entry is not None
    assert entry.node_id == NODE_B
    assert entry.times_up == 2
    assert entry.down_reason is None
    assert entry.up_since == 6.0
    assert registry.by_node_id(NODE_B) is entry
    assert registry.by_node_id(NODE_A) is None


def test_admit_refuses_different_node_id_while_up() -> None:
    registry = make_registry()
    first = Conn()
    admit(registry, first, node_id=NODE_A)
    admission = admit(registry, Conn(), node_id=NODE_B, epoch=2)
    assert not admission.accepted
    assert admission.reason == "ip 127.0.0.3 is connected as node node-a; refusing node node-b"
    assert admission.replaced is None
    entry = registry.get(PEER)
    assert entry is not None
    assert admission.entry is entry
    assert entry.conn is first
    assert entry.node_id == NODE_A


def test_admit_new_epoch_replaces_stale_connection_at_once() -> None:
    registry = make_registry()
    stale = Conn()
    admit(registry, stale, epoch=1, direction=OUTBOUND, now=0.0)
    fresh = Conn()
    # A restarted peer dials us: other direction, but a new epoch wins anyway.
    admission = admit(registry, fresh, epoch=2, direction=INBOUND, now=4.0)
    assert admission.accepted
    assert admission.replaced is stale
    assert admission.replaced_reason == "superseded by a new session of node-a (epoch 2)"
    entry = admission.entry
    assert entry is not None
    assert (entry.conn, entry.epoch, entry.direction) == (fresh, 2, INBOUND)
    assert entry.times_up == 2
    assert entry.up_since == 4.0
    assert registry.by_conn(stale) is None
    assert registry.by_conn(fresh) is entry


def test_closed_of_replaced_connection_is_not_a_state_change() -> None:
    registry = make_registry()
    stale = Conn()
    admit(registry, stale, epoch=1, now=0.0)
    fresh = Conn()
    admit(registry, fresh, epoch=2, now=1.0)
    assert registry.closed(stale, "superseded", now=2.0) is None
    entry = registry.get(PEER)
    assert entry is not None
    assert entry.state == UP
    assert entry.conn is fresh
    assert entry.last_change == 1.0


def test_admit_same_session_same_direction_newer_connection_wins() -> None:
    # Two connections from one IP (different source ports): one entry.
    registry = make_registry()
    first, second = Conn("port-50001"), Conn("port-50002")
    admit(registry, first, epoch=3, direction=INBOUND)
    admission = admit(registry, second, epoch=3, direction=INBOUND, now=1.0)
    assert admission.accepted
    assert admission.replaced is first
    assert admission.replaced_reason == "superseded by a newer connection from the same session"
    assert len(registry) == 1
    assert registry.up() == [admission.entry]
    assert registry.by_conn(first) is None
    assert registry.closed(first, "closed by us", now=2.0) is None
    entry = registry.get(PEER)
    assert entry is not None
    assert entry.conn is second


@pytest.mark.parametrize("order_on_2", ["2to3 first", "3to2 first"])
@pytest.mark.parametrize("order_on_3", ["2to3 first", "3to2 first"])
def test_simultaneous_open_both_sides_keep_the_same_connection(
    order_on_2: str, order_on_3: str
) -> None:
    low, high = "127.0.0.2", "127.0.0.3"
    on_low = make_registry(low)
    on_high = make_registry(high)
    dialled_by_low = Conn("dialled by .2")
    dialled_by_high = Conn("dialled by .3")
    # What each node sees of each connection: (conn, peer ip, direction, peer node, epoch).
    seen_on_low = {
        "2to3 first": (dialled_by_low, high, OUTBOUND, "node-high", 5),
        "3to2 first": (dialled_by_high, high, INBOUND, "node-high", 5),
    }
    seen_on_high = {
        "2to3 first": (dialled_by_low, low, INBOUND, "node-low", 9),
        "3to2 first": (dialled_by_high, low, OUTBOUND, "node-low", 9),
    }
    expected_reason = "simultaneous open: keeping the connection dialled by 127.0.0.3"
    for registry, seen, first_key in (
        (on_low, seen_on_low, order_on_2),
        (on_high, seen_on_high, order_on_3),
    ):
        second_key = "3to2 first" if first_key == "2to3 first" else "2to3 first"
        conn, ip, direction, node_id, epoch = seen[first_key]
        assert registry.admit(conn, ip, node_id, epoch, direction, 7000, 0.0).accepted
        conn, ip, direction, node_id, epoch = seen[second_key]
        admission = registry.admit(conn, ip, node_id, epoch, direction, 7000, 0.1)
        if conn is dialled_by_high:
            assert admission.accepted
            assert admission.replaced is dialled_by_low
            assert admission.replaced_reason == expected_reason
        else:
            assert not admission.accepted
            assert admission.reason == expected_reason
    low_entry = on_low.get(high)
    high_entry = on_high.get(low)
    assert low_entry is not None and high_entry is not None
    assert low_entry.conn is dialled_by_high
    assert high_entry.conn is dialled_by_high
    assert (low_entry.direction, high_entry.direction) == (INBOUND, OUTBOUND)
    assert on_low.by_conn(dialled_by_low) is None
    assert on_high.by_conn(dialled_by_low) is None


def test_redial_long_after_the_connection_was_made_is_not_a_simultaneous_open() -> None:
    # Rule 4e: at the higher address, X (dialled by us) is half-open: the
    # lower peer lost it and dials again. Within the window that would be a
    # simultaneous open and refused; later, the newer connection wins.
    registry = Registry("127.0.0.3", max_peers=8, prune_after_s=60.0, simultaneous_window_s=4.0)
    x = Conn("x")
    assert admit(registry, x, ip="127.0.0.2", direction=OUTBOUND, now=0.0).accepted
    early = admit(registry, Conn("early"), ip="127.0.0.2", direction=INBOUND, now=4.0)
    assert not early.accepted
    assert early.reason == "simultaneous open: keeping the connection dialled by 127.0.0.3"
    y = Conn("y")
    later = admit(registry, y, ip="127.0.0.2", direction=INBOUND, now=4.5)
    assert later.accepted
    assert later.replaced is x
    assert later.replaced_reason == "superseded by a newer connection: the peer had lost this one"
    entry = registry.get("127.0.0.2")
    assert entry is not None and entry.conn is y and entry.direction == INBOUND
    assert registry.by_conn(x) is None
    # Without a window (the pure default) rule 4d holds however old X is.
    plain = make_registry("127.0.0.3")
    admit(plain, Conn(), ip="127.0.0.2", direction=OUTBOUND, now=0.0)
    assert not admit(plain, Conn(), ip="127.0.0.2", direction=INBOUND, now=1e6).accepted


def test_settled_connection_is_not_displaced_by_a_simultaneous_open() -> None:
    """Rule 4e: once both sides said ready on a connection, a connection from
    the other direction in the same session means the peer lost the first,
    so the newcomer wins even where a simultaneous open would keep the first."""
    registry = make_registry("127.0.0.9")
    inbound = Conn()
    admit(registry, inbound, ip="127.0.0.10", direction=INBOUND)  # dialled by the higher
    assert registry.settle(inbound, 1.0) is registry.get("127.0.0.10")
    assert registry.get("127.0.0.10").settled  # type: ignore[union-attr]
    # A dial started before it settled is a simultaneous open's, however late.
    late = registry.admit(Conn(), "127.0.0.10", NODE_A, 1, OUTBOUND, 7000, 1.5, started_at=0.9)
    assert not late.accepted
    assert late.reason == "simultaneous open: keeping the connection dialled by 127.0.0.10"
    # One started after it settled: the peer lost the settled one.
    newcomer = Conn()
    admission = registry.admit(
        newcomer, "127.0.0.10", NODE_A, 1, OUTBOUND, 7000, 2.0, started_at=1.5
    )
    assert admission.accepted and admission.replaced is inbound
    assert admission.replaced_reason == (
        "superseded by a newer connection: the peer had lost this one"
    )
    entry = registry.get("127.0.0.10")
    assert entry is not None and entry.conn is newcomer and not entry.settled


def test_settle_knows_only_current_connections() -> None:
    registry = make_registry()
    assert registry.settle(Conn(), 0.0) is None
    conn = Conn()
    admit(registry, conn)
    registry.closed(conn, "gone", 1.0)
    assert registry.settle(conn, 1.0) is None


def test_simultaneous_open_compares_addresses_numerically() -> None:
    # Lexically "127.0.0.10" < "127.0.0.9"; numerically it is higher.
    registry = make_registry("127.0.0.9")
    inbound = Conn()
    admit(registry, inbound, ip="127.0.0.10", direction=INBOUND)
    admission = admit(registry, Conn(), ip="127.0.0.10", direction=OUTBOUND)
    assert not admission.accepted
    assert admission.reason == "simultaneous open: keeping the connection dialled by 127.0.0.10"


def test_simultaneous_open_between_v4_and_v6_prefers_v6() -> None:
    registry = make_registry("10.0.0.1")
    inbound = Conn()
    admit(registry, inbound, ip="fd00::1", direction=INBOUND)
    admission = admit(registry, Conn(), ip="fd00::1", direction=OUTBOUND)
    assert not admission.accepted
    assert admission.reason == "simultaneous open: keeping the connection dialled by fd00::1"


def test_admit_keeps_known_listen_port_when_hello_has_none() -> None:
    registry = make_registry()
    registry.add_configured(PEER, 7100, now=0.0)
    conn = Conn()
    entry = admit(registry, conn, listen_port=None, direction=OUTBOUND).entry
    assert entry is not None
    assert entry.listen_port == 7100
    assert entry.configured
    registry.closed(conn, "eof", now=1.0)
    entry = admit(registry, Conn(), listen_port=7200, direction=INBOUND, now=2.0).entry
    assert entry is not None
    assert entry.listen_port == 7100  # configured: kept


def test_admit_rejects_misuse() -> None:
    registry = make_registry()
    conn = Conn()
    admit(registry, conn)
    with pytest.raises(ValueError, match="already admitted"):
        admit(registry, conn, epoch=2)
    with pytest.raises(ValueError, match="direction must be 'inbound' or 'outbound', got 'up'"):
        admit(registry, Conn(), direction="up")
    with pytest.raises(InvalidAddress, match=r"^invalid ip address 'peer'$"):
        admit(registry, Conn(), ip="peer")


# -- closing -----------------------------------------------------------------


def test_closed_marks_current_connection_down() -> None:
    registry = make_registry()
    conn = Conn()
    admit(registry, conn, epoch=4, direction=OUTBOUND, now=1.0)
    entry = registry.closed(conn, "keepalive timeout", now=9.0)
    assert entry is not None
    assert entry.state == DOWN
    assert entry.conn is None
    assert entry.down_reason == "keepalive timeout"
    assert entry.last_change == 9.0
    assert entry.up_since is None
    # The last connection's facts stay for status displays.
    assert (entry.node_id, entry.epoch, entry.direction) == (NODE_A, 4, OUTBOUND)
    assert registry.by_conn(conn) is None
    assert registry.up() == []
    assert registry.closed(conn, "again", now=10.0) is None
    assert entry.down_reason == "keepalive timeout"


def test_closed_of_unknown_or_refused_connection_returns_none() -> None:
    registry = make_registry()
    assert registry.closed(Conn(), "eof", now=0.0) is None
    live = Conn()
    admit(registry, live, node_id=NODE_A)
    refused = Conn()
    assert not admit(registry, refused, node_id=NODE_B).accepted
    assert registry.closed(refused, "refused", now=1.0) is None
    entry = registry.get(PEER)
    assert entry is not None
    assert entry.conn is live


# -- configured and learned peers, pruning -------------------------------------


def test_add_configured_creates_down_entry_and_updates_port() -> None:
    registry = make_registry()
    entry = registry.add_configured("::ffff:127.0.0.3", 7000, now=0.0)
    assert (entry.ip, entry.state, entry.listen_port, entry.configured) == (PEER, DOWN, 7000, True)
    assert entry.conn is None
    assert entry.times_up == 0
    again = registry.add_configured(PEER, 7001, now=1.0)
    assert again is entry
    assert entry.listen_port == 7001
    assert len(registry) == 1


def test_add_configured_marks_learned_entry_configured() -> None:
    registry = make_registry()
    learned = registry.learn(PEER, 7000, NODE_A, now=0.0)
    entry = registry.add_configured(PEER, 7005, now=1.0)
    assert entry is learned
    assert entry.configured
    assert entry.listen_port == 7005


def test_add_configured_rejects_our_address_bad_port_and_full_table() -> None:
    registry = make_registry(max_peers=1)
    with pytest.raises(ConfigError, match=r"^configured peer 127\.0\.0\.2 is our own address$"):
        registry.add_configured(OURS, 7000, now=0.0)
    for port in (0, 65536, -1, "7000", True):
        with pytest.raises(ConfigError) as raised:
            registry.add_configured(PEER, port, now=0.0)  # type: ignore[arg-type]
        assert str(raised.value) == f"invalid port {port!r} for 127.0.0.3: expected 1..65535"
    registry.add_configured(PEER, 7000, now=0.0)
    with pytest.raises(ConfigError) as raised:
        registry.add_configured("127.0.0.4", 7000, now=0.0)
    assert str(raised.value) == (
        "peer table full (1 entries): cannot add configured peer 127.0.0.4"
    )


def test_learn_adds_down_entry_and_leaves_existing_state_alone() -> None:
    registry = make_registry()
    entry = registry.learn("127.0.0.5", 7000, "node-e", now=0.0)
    assert entry is not None
    assert (entry.state, entry.listen_port, entry.node_id, entry.configured) == (
        DOWN,
        7000,
        "node-e",
        False,
    )
    assert registry.by_node_id("node-e") is entry

    conn = Conn()
    up_entry = admit(registry, conn, ip=PEER, listen_port=None, now=1.0).entry
    assert up_entry is not None
    assert up_entry.listen_port is None
    learned = registry.learn(PEER, 7300, "someone-else", now=2.0)
    assert learned is up_entry
    assert up_entry.state == UP
    assert up_entry.conn is conn
    assert up_entry.node_id == NODE_A
    assert up_entry.listen_port == 7300  # filled in: it was unknown
    assert up_entry.last_change == 1.0
    registry.learn(PEER, 7400, None, now=3.0)
    assert up_entry.listen_port == 7300  # known ports are not overwritten


def test_learn_returns_none_for_our_ip_and_full_table() -> None:
    registry = make_registry(max_peers=1)
    assert registry.learn("::ffff:127.0.0.2", 7000, None, now=0.0) is None
    assert registry.learn(PEER, 7000, None, now=0.0) is not None
    assert registry.learn("127.0.0.4", 7000, None, now=1.0) is None
    assert len(registry) == 1


def test_learn_prunes_full_table_first() -> None:
    registry = make_registry(max_peers=1, prune_after_s=10.0)
    registry.learn(PEER, 7000, None, now=0.0)
    entry = registry.learn("127.0.0.4", 7000, None, now=10.0)
    assert entry is not None
    assert [pruned.ip for pruned in registry.take_pruned()] == [PEER]


def test_learn_rejects_invalid_address_and_port() -> None:
    registry = make_registry()
    with pytest.raises(InvalidAddress, match=r"^invalid ip address 'bad'$"):
        registry.learn("bad", 7000, None, now=0.0)
    with pytest.raises(
        InvalidAddress, match=r"^invalid port 0 for 127\.0\.0\.3: expected 1\.\.65535$"
    ):
        registry.learn(PEER, 0, None, now=0.0)


def test_prune_removes_only_old_down_unconfigured_entries() -> None:
    registry = make_registry(prune_after_s=30.0)
    registry.add_configured("10.0.0.1", 7000, now=0.0)  # configured: never pruned
    registry.learn("10.0.0.2", 7000, "learned", now=0.0)  # down since 0
    up_conn = Conn()
    admit(registry, up_conn, ip="10.0.0.3", node_id="up", now=0.0)  # up: never pruned
    recent = Conn()
    admit(registry, recent, ip="10.0.0.4", node_id="recent", now=0.0)
    registry.closed(recent, "eof", now=20.0)  # down since 20

    assert registry.prune(now=29.9) == []
    pruned = registry.prune(now=30.0)
    assert [entry.ip for entry in pruned] == ["10.0.0.2"]
    assert pruned[0].node_id == "learned"  # returned intact for the node's log
    assert registry.by_node_id("learned") is None
    assert [entry.ip for entry in registry.prune(now=50.0)] == ["10.0.0.4"]
    assert registry.prune(now=10_000.0) == []
    assert sorted(entry.ip for entry in registry) == ["10.0.0.1", "10.0.0.3"]


def test_configured_entries_count_towards_cap_and_are_never_pruned() -> None:
    registry = make_registry(max_peers=2, prune_after_s=0.0)
    registry.add_configured("10.0.0.1", 7000, now=0.0)
    registry.add_configured("10.0.0.2", 7000, now=0.0)
    admission = admit(registry, Conn(), ip="10.0.0.3", now=1_000_000.0)
    assert not admission.accepted
    assert admission.reason == "peer table full (2 entries)"
    assert len(registry) == 2


# -- lookups -------------------------------------------------------------------


def test_lookups_normalise_and_index() -> None:
    registry = make_registry()
    conn = Conn()
    entry = admit(registry, conn, ip="::ffff:127.0.0.3").entry
    assert entry is not None
    assert registry.get("::ffff:127.0.0.3") is entry
    assert registry.get("127.0.0.4") is None
    assert "::ffff:127.0.0.3" in registry
    assert PEER in registry
    assert "not an ip" not in registry
    assert 5 not in registry
    assert list(registry) == [entry]
    assert len(registry) == 1
    assert registry.by_conn(Conn()) is None
    assert registry.by_node_id("nobody") is None
    with pytest.raises(InvalidAddress):
        registry.get("nope")


def test_by_node_id_prefers_the_entry_that_is_up() -> None:
    # A board that moved to a new IP leaves its old entry down until pruned.
    registry = make_registry()
    old_conn = Conn()
    admit(registry, old_conn, ip="10.0.0.5", node_id=NODE_A, now=0.0)
    registry.closed(old_conn, "eof", now=1.0)
    new_entry = admit(registry, Conn(), ip="10.0.0.6", node_id=NODE_A, now=2.0).entry
    assert registry.by_node_id(NODE_A) is new_entry


def test_iteration_is_safe_while_pruning() -> None:
    registry = make_registry(prune_after_s=0.0)
    for host in range(1, 5):
        registry.learn(f"10.0.0.{host}", 7000, None, now=0.0)
    for entry in registry:
        assert isinstance(entry, PeerEntry)
        registry.prune(now=1.0)
    assert len(registry) == 0


def test_reprs_are_informative() -> None:
    registry = make_registry()
    entry = admit(registry, Conn(), epoch=3, direction=OUTBOUND).entry
    assert repr(entry).startswith("<PeerEntry 127.0.0.3 up node=node-a epoch=3 outbound")
    refused = admit(registry, Conn(), node_id=NODE_B)
    assert repr(refused) == (
        "<Admission refused: ip 127.0.0.3 is connected as node node-a; refusing node node-b>"
    )
    assert repr(registry) == "<Registry 127.0.0.2: 1 up, 1/8 entries>"


# -- property test: invariants under random admit/closed sequences ---------------

IPS = ["10.0.0.1", "10.0.0.2", "::ffff:10.0.0.2", "10.0.0.3", "10.0.0.4", "fd00::5", "10.0.0.9"]


class RegistryMachine(RuleBasedStateMachine):
    conns = Bundle("conns")

    @initialize(max_peers=st.integers(1, 5), prune_after_s=st.sampled_from([0.0, 5.0, 50.0]))
    def setup(self, max_peers: int, prune_after_s: float) -> None:
        self.registry = Registry("10.0.0.9", max_peers=max_peers, prune_after_s=prune_after_s)
        self.now = 0.0
        self.admitted: list[Conn] = []

    @rule(
        target=conns,
        ip=st.sampled_from(IPS),
        node=st.sampled_from(["a", "b", "c"]),
        epoch=st.integers(1, 3),
        direction=st.sampled_from([INBOUND, OUTBOUND]),
        listen_port=st.sampled_from([None, 7000, 7001]),
    )
    def admit_conn(
        self, ip: str, node: str, epoch: int, direction: str, listen_port: int | None
    ) -> Conn:
        conn = Conn()
        before = self.registry.get(ip)
        previous = before.conn if before is not None else None
        admission = self.registry.admit(conn, ip, node, epoch, direction, listen_port, self.now)
        if admission.accepted:
            assert admission.entry is not None
            assert admission.entry.conn is conn
            assert admission.replaced is previous
            assert (admission.replaced is None) == (admission.replaced_reason is None)
            self.admitted.append(conn)
        else:
            assert admission.reason
            assert admission.replaced is None
            if previous is not None:
                assert self.registry.get(ip).conn is previous  # type: ignore[union-attr]
        return conn

    @rule(conn=conns, reason=st.sampled_from(["eof", "reset", "keepalive timeout"]))
    def close_conn(self, conn: Conn, reason: str) -> None:
        current = self.registry.by_conn(conn)
        entry = self.registry.closed(conn, reason, self.now)
        assert entry is current
        if entry is not None:
            assert entry.state == DOWN
            assert entry.down_reason == reason
            assert entry.last_change == self.now

    @rule(ip=st.sampled_from(IPS), port=st.sampled_from([7000, 7002]))
    def learn(self, ip: str, port: int) -> None:
        before = self.registry.get(ip)
        state = before.state if before is not None else None
        entry = self.registry.learn(ip, port, None, self.now)
        if before is not None:
            assert entry is before
            assert entry.state == state

    @rule(seconds=st.sampled_from([0.5, 3.0, 10.0, 60.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def prune(self) -> None:
        for entry in self.registry.prune(self.now):
            assert entry.state == DOWN
            assert not entry.configured
            assert entry.ip not in self.registry

    @invariant()
    def invariants_hold(self) -> None:
        registry = self.registry
        assert len(registry) <= registry.max_peers
        entries = list(registry)
        live = [entry.conn for entry in entries if entry.conn is not None]
        # At most one connection per IP, and each connection in one entry.
        assert len({id(conn) for conn in live}) == len(live)
        assert len({entry.ip for entry in entries}) == len(entries)
        for entry in entries:
            assert entry.ip == normalise_ip(entry.ip)
            assert registry.get(entry.ip) is entry
            assert (entry.state == UP) == (entry.conn is not None)
            assert entry.state in (UP, DOWN)
            if entry.state == UP:
                assert registry.by_conn(entry.conn) is entry
                assert entry.up_since is not None
                assert entry.node_id is not None
            if entry.node_id is not None:
                found = registry.by_node_id(entry.node_id)
                assert found is not None and found.node_id == entry.node_id
        # The by_conn index holds the current connections and nothing else.
        for conn in self.admitted:
            entry = registry.by_conn(conn)
            assert entry is None or entry.conn is conn
        assert sorted(map(id, (e.conn for e in registry.up()))) == sorted(map(id, live))
        assert "10.0.0.9" not in registry


RegistryMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
TestRegistryInvariants = RegistryMachine.TestCase


def test_a_peers_bad_address_is_never_blamed_on_the_configuration() -> None:
    """Data from a peer (a peer list, a beacon) never raises ConfigError; a
    configured peer's bad address does."""
    registry = make_registry()
    assert not issubclass(InvalidAddress, ConfigError)
    with pytest.raises(InvalidAddress) as from_peer:
        registry.learn("10.0.0.999", 7300, None, 0.0)
    assert not isinstance(from_peer.value, ConfigError)
    bad_port = r"^invalid port 0 for 127\.0\.0\.3: expected 1\.\.65535$"
    with pytest.raises(ConfigError, match=bad_port):
        registry.add_configured("127.0.0.3", 0, 0.0)
