"""A VM on VLAN 100 behind an untrusted port: the binding records the VLAN and enforces it.

NOTE: this kernel has no 8021q module (no VLAN devices), so the VM's and the
server's tagged frames are crafted on packet sockets. The receiving veth moves
the tag into the skb metadata before tc ingress, as a NIC with VLAN offload does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.dhcp_lab import (
    NET,
    SERVER_IP,
    SwitchLab,
    Wire,
    client_frame,
    server_frame,
    switches,
    udp_frame,
)
from xfer.dhcp import packet
from xfer.lab.hosts import Hosts

VLAN = 100
IP = f"{NET}.90"


@pytest.fixture
def lab(hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SwitchLab]:
    with switches(hosts, tmp_path, monkeypatch, ("sw", ("vm",))) as (built,):
        yield built


def test_tagged_lease_binds_with_its_vlan(lab: SwitchLab) -> None:
    lab.attach()
    with Wire(lab.vms["vm"], "eth0") as vm, Wire(lab.srv, "eth0") as srv:
        mac = vm.mac
        vm.send(packet.vlan_tag(client_frame(mac, packet.build(1, packet.REQUEST, mac,
                                                               requested=IP)), VLAN))
        time.sleep(0.05)
        srv.send(packet.vlan_tag(server_frame(srv.mac, mac, packet.build(
            2, packet.ACK, mac, yiaddr=IP, lease=300, server=SERVER_IP)), VLAN))
        time.sleep(0.1)
        rows = lab.bindings()
        assert [(r["mac"], r["ip"], r["port"], r["vlan"]) for r in rows] == [
            (mac, IP, "p-vm", VLAN)]

        def passes(tag: int | None) -> bool:
            token = f"vlan-{tag}-{time.monotonic_ns()}".encode()
            frame = udp_frame(mac, srv.mac, IP, SERVER_IP, 40000, 40001, token)
            srv.drain()
            vm.send(frame if tag is None else packet.vlan_tag(frame, tag))
            return srv.wait_for(lambda f: token in f, 0.5) is not None

        assert passes(VLAN)
        assert not passes(None)         # untagged: not the binding's VLAN
        assert not passes(200)          # another VLAN
    assert lab.counters("p-vm")["drop_source"] >= 2
