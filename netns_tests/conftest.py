"""Kernel tests: each builds its own namespaces and removes them even when it fails.

Tests marked ``privileged`` skip, with the reason, when not root or when the
kernel lacks what they need; the probes try the feature instead of guessing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from xfer.lab.hosts import Hosts


def _probe_ctnetlink() -> str | None:
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
        s.close()
    except OSError as exc:
        return f"no ctnetlink socket: {exc}"
    return None


def privileged_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, ctnetlink, BPF)"
    if not os.path.isdir("/proc/sys/net/netfilter"):
        return "kernel has no netfilter conntrack"
    return _probe_ctnetlink()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = privileged_skip_reason()
    for item in items:
        if "netns_tests" in str(item.fspath):
            item.add_marker(pytest.mark.privileged)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    """A ``Hosts`` with a prefix unique to this test and process; removed afterwards."""
    prefix = f"t{os.getpid() % 10000}{abs(hash(request.node.nodeid)) % 10000}"
    h = Hosts(prefix)
    try:
        yield h
    finally:
        h.close()
