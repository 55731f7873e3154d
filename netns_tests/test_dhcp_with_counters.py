"""The source guard and the counters program share a VM port: guard first, counters still run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.dhcp_lab import NET, SERVER_IP, SwitchLab, Wire, switches, udp_frame
from xfer.counters import device as counters_device
from xfer.counters import model as counters
from xfer.counters import transfer as counters_transfer
from xfer.lab.hosts import Hosts
from xfer.model import VmIdentity


@pytest.fixture
def lab(hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SwitchLab]:
    with switches(hosts, tmp_path, monkeypatch, ("sw", ("vm",))) as (built,):
        try:
            yield built
        finally:
            counters_device.detach("p-vm", built.sw, unpin=True)


def test_guard_drops_before_counting_and_lets_counters_see_the_rest(lab: SwitchLab) -> None:
    lab.attach()
    counters_device.attach("p-vm", lab.sw)
    ip, spoofed = f"{NET}.80", f"{NET}.81"
    lab.crafted_lease("vm", ip, 300)
    mac = lab.mac(lab.vms["vm"])
    for _ in range(3):
        assert lab.ping("vm")
    with Wire(lab.vms["vm"], "eth0") as vm, Wire(lab.srv, "eth0") as srv:
        for _ in range(5):
            vm.send(udp_frame(mac, srv.mac, spoofed, SERVER_IP, 40000, 40001, b"spoof"))
    rows = {(r["mac"], r["ip"]): r for r in counters.rows(
        counters_transfer.show(VmIdentity("vm", macs=(mac,)), lab.sw, dev="p-vm"))}
    assert rows[(mac, ip)]["tx_packets"] >= 3          # passed the guard, then counted
    assert (mac, spoofed) not in rows                   # dropped by the guard, never counted
    assert lab.counters("p-vm")["drop_source"] >= 5
