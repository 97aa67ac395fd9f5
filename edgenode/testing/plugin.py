"""The fault kit as a pytest plugin (entry point ``edgenode``): fixtures and a seed.

Installing edgenode registers it; ``-p no:edgenode`` turns it off. Fixtures:

* ``tcp_proxy``: a running :class:`~edgenode.testing.proxy.TcpProxy`,
  closed after the test.
* ``pty_relay``: a running, quiet :class:`~edgenode.testing.ptyrelay.PtyRelay`.
* ``netns_pair``: a :class:`~edgenode.testing.netns.NetnsPair`, created;
  the test is skipped, with the reason, when that needs root or ``ip``.
* ``node_processes``: a factory of :class:`~edgenode.testing.procs.NodeProcess`
  (``node_processes(state_dir, "127.0.0.2", peers=..., authorised=...)``):
  real ``edgenode run`` processes to kill, stop and continue; every one is
  killed and reaped after the test.
* ``fault_seed``: the seed the proxy and the relay use. It is derived from the test's
  name, or set for every test with ``--fault-seed N``; a failing test that
  used it shows it in its report, to rerun with the same faults.

Importing this module is cheap (pytest loads it in every run): the kit's
modules load inside the fixtures that use them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from edgenode.testing.netns import NetnsPair
    from edgenode.testing.procs import NodeProcess
    from edgenode.testing.proxy import TcpProxy
    from edgenode.testing.ptyrelay import PtyRelay

_SEED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgenode", "edgenode fault injection")
    group.addoption(
        "--fault-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed the fault kit's randomness (default: derived from each test's name)",
    )


@pytest.fixture
def fault_seed(request: pytest.FixtureRequest) -> int:
    """The seed for this test's faults: ``--fault-seed``, or one derived from its name."""
    seed = request.config.getoption("fault_seed", None)
    if seed is None:
        seed = zlib.crc32(request.node.nodeid.encode())
    request.node.stash[_SEED] = seed
    return int(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    seed = item.stash.get(_SEED, None)
    if seed is not None and report.failed:
        report.sections.append(("edgenode fault seed", f"{seed} (rerun with --fault-seed={seed})"))
    return report


@pytest.fixture
def tcp_proxy(fault_seed: int) -> Iterator[TcpProxy]:
    """A running fault-injecting TCP proxy; add routes or links to it."""
    from edgenode.testing.proxy import TcpProxy

    with TcpProxy(seed=fault_seed) as proxy:
        yield proxy


@pytest.fixture
def pty_relay(fault_seed: int) -> Iterator[PtyRelay]:
    """Two pseudo-terminals joined by a (quiet) garbling relay."""
    from edgenode.testing.ptyrelay import PtyRelay

    with PtyRelay(seed=fault_seed) as relay:
        yield relay


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """Two network namespaces joined by a veth pair (skipped unless root with ``ip``)."""
    from edgenode.testing.netns import NetnsPair, skip_reason

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetnsPair() as pair:
        yield pair


@pytest.fixture
def node_processes() -> Iterator[Callable[..., NodeProcess]]:
    """Make (not start) node processes; all are killed and reaped after the test."""
    from edgenode.testing.procs import NodeProcess

    made: list[NodeProcess] = []

    def make(*args: Any, **kwargs: Any) -> NodeProcess:
        proc = NodeProcess(*args, **kwargs)
        made.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in made:
            proc.close()
