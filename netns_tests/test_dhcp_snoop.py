"""DHCP snooping with a real dnsmasq and a real dhclient: bindings, source guard, RELEASE."""

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


@pytest.fixture
def lab(hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SwitchLab]:
    with switches(hosts, tmp_path, monkeypatch, ("sw", ("vm", "evil"))) as (built,):
        yield built


def probe(lab: SwitchLab, vm: str, src_mac: str, src_ip: str) -> bool:
    """Send one UDP datagram from the VM port with the given source; did the server get it?"""
    vm_wire, srv_wire = Wire(lab.vms[vm], "eth0"), Wire(lab.srv, "eth0")
    token = f"probe-{time.monotonic_ns()}".encode()
    try:
        srv_wire.drain()
        vm_wire.send(udp_frame(src_mac, srv_wire.mac, src_ip, SERVER_IP, 40000, 40001, token))
        return srv_wire.wait_for(lambda f: token in f, 0.5) is not None
    finally:
        vm_wire.close()
        srv_wire.close()


def test_real_lease_is_bound_and_guards_the_port(lab: SwitchLab) -> None:
    lab.attach()
    lab.dnsmasq(lab.srv, "eth0", f"{NET}.100", f"{NET}.150", "real", lease="2m")
    vm_mac = lab.mac(lab.vms["vm"])
    assert not lab.ping("vm")                       # no address, nothing bound yet
    lab.dhclient("vm")
    ip = lab.vm_ip("vm")
    assert ip and ip.startswith(f"{NET}.")

    rows = lab.bindings()
    assert len(rows) == 1
    row = rows[0]
    assert (row["mac"], row["ip"], row["port"], row["vlan"]) == (vm_mac, ip, "p-vm", 0)
    assert 100 < float(row["lease_remaining"]) <= 120      # type: ignore[arg-type]

    assert lab.ping("vm")                                   # the VM's own traffic passes
    assert probe(lab, "vm", vm_mac, ip)
    before = lab.counters("p-vm").get("drop_source", 0)
    assert not probe(lab, "vm", vm_mac, f"{NET}.77")        # spoofed source IP
    assert not probe(lab, "vm", "02:de:ad:be:ef:01", ip)    # spoofed source MAC
    assert lab.counters("p-vm")["drop_source"] >= before + 2

    # the other VM port: the first VM's address is not bound there
    assert not probe(lab, "evil", lab.mac(lab.vms["evil"]), ip)
    assert not probe(lab, "evil", vm_mac, ip)               # not even with its MAC

    lab.release("vm")
    deadline = time.monotonic() + 3
    while lab.bindings() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.bindings() == []
    assert lab.counters("p-vm").get("binding_removed", 0) >= 1
    assert not probe(lab, "vm", vm_mac, ip)                 # RELEASE ended the binding


def test_arp_inspection(lab: SwitchLab) -> None:
    lab.attach()
    ip = f"{NET}.20"
    lab.crafted_lease("vm", ip, 300)
    vm_wire, srv_wire = Wire(lab.vms["vm"], "eth0"), Wire(lab.srv, "eth0")
    try:
        def arp_from(sha: str, spa: str) -> bool:
            body = packet.arp(1, sha, spa, "00:00:00:00:00:00", SERVER_IP)
            srv_wire.drain()
            vm_wire.send(packet.ethernet(packet.BROADCAST, sha, 0x0806, body))
            return srv_wire.wait_for(lambda f: f[12:14] == b"\x08\x06" and body in f,
                                     0.5) is not None

        assert arp_from(vm_wire.mac, ip)                    # bound: passes
        assert arp_from(vm_wire.mac, "0.0.0.0")             # RFC 5227 probe: passes
        assert not arp_from(vm_wire.mac, f"{NET}.21")       # claims an address not bound
        assert not arp_from("02:de:ad:be:ef:02", ip)        # sender MAC not its own
        assert lab.counters("p-vm")["drop_arp"] >= 2
    finally:
        vm_wire.close()
        srv_wire.close()


def test_rogue_server_on_an_untrusted_port_does_not_reach_clients(lab: SwitchLab) -> None:
    lab.attach()
    # the only DHCP server sits behind the untrusted port of "evil"
    lab.set_ip("evil", f"{NET}.2")
    lab.dnsmasq(lab.vms["evil"], "eth0", f"{NET}.200", f"{NET}.210", "rogue")
    assert lab.dhclient_once("vm") != 0                     # no offer ever reached the VM
    assert lab.vm_ip("vm") is None
    assert lab.counters("p-evil")["drop_rogue_server"] >= 1
    assert lab.bindings() == []

    # control: in observe mode the same rogue server would have given a lease
    lab.attach(mode="observe")
    assert lab.dhclient_once("vm") == 0
    assert (lab.vm_ip("vm") or "").startswith(f"{NET}.2")
    assert lab.counters("p-evil")["observed"] >= 1


def test_observe_mode_counts_without_dropping(lab: SwitchLab) -> None:
    lab.attach(mode="observe")
    vm_mac = lab.mac(lab.vms["vm"])
    assert probe(lab, "vm", vm_mac, f"{NET}.99")
    counters = lab.counters("p-vm")
    assert counters["drop_source"] >= 1 and counters["observed"] >= 1


def test_short_lease_expires_and_traffic_stops(lab: SwitchLab) -> None:
    lab.attach()
    ip = f"{NET}.30"
    lab.crafted_lease("vm", ip, lease=2)
    assert [r["ip"] for r in lab.bindings()] == [ip]
    assert lab.ping("vm")
    time.sleep(2.3)
    assert not lab.ping("vm")                               # the datapath refuses it
    assert lab.bindings() == []
    rows = lab.xfer("dhcp", "bindings", "--netns", lab.sw, "--all", "--json").stdout
    assert ip not in rows                                   # and deleted it on the spot
    assert lab.counters("p-vm")["expired"] >= 1


def test_nak_and_decline_remove_the_binding(lab: SwitchLab) -> None:
    lab.attach()
    ip = f"{NET}.40"
    lab.crafted_lease("vm", ip, 300)
    vm_mac = lab.mac(lab.vms["vm"])
    srv_wire = Wire(lab.srv, "eth0")
    try:
        srv_wire.send(server_frame(srv_wire.mac, vm_mac,
                                   packet.build(2, packet.NAK, vm_mac, server=SERVER_IP)))
    finally:
        srv_wire.close()
    time.sleep(0.1)
    assert lab.bindings() == []
    assert not lab.ping("vm")

    lab.crafted_lease("vm", ip, 300)
    assert lab.bindings()
    vm_wire = Wire(lab.vms["vm"], "eth0")
    try:
        vm_wire.send(client_frame(vm_mac, packet.build(1, packet.DECLINE, vm_mac,
                                                       requested=ip)))
    finally:
        vm_wire.close()
    time.sleep(0.1)
    assert lab.bindings() == []


def test_a_new_address_replaces_the_old_binding(lab: SwitchLab) -> None:
    lab.attach()
    lab.crafted_lease("vm", f"{NET}.50", 300)
    lab.crafted_lease("vm", f"{NET}.51", 300)
    assert [r["ip"] for r in lab.bindings()] == [f"{NET}.51"]


def test_another_port_cannot_release_or_steal_a_binding(lab: SwitchLab) -> None:
    lab.attach()
    ip = f"{NET}.45"
    lab.crafted_lease("vm", ip, 300)
    vm_mac = lab.mac(lab.vms["vm"])
    with Wire(lab.vms["evil"], "eth0") as evil, Wire(lab.srv, "eth0") as srv:
        # evil copies the VM's MAC: RELEASE (from 0.0.0.0, which the guard lets through)
        evil.send(client_frame(vm_mac, packet.build(1, packet.RELEASE, vm_mac, ciaddr=ip)))
        # ... and REQUEST for the VM's address, hoping the ACK moves the binding to its port
        evil.send(client_frame(vm_mac, packet.build(1, packet.REQUEST, vm_mac, requested=ip)))
        time.sleep(0.05)
        srv.send(server_frame(srv.mac, vm_mac, packet.build(2, packet.ACK, vm_mac, yiaddr=ip,
                                                            lease=300, server=SERVER_IP)))
        time.sleep(0.1)
    assert [(r["ip"], r["port"]) for r in lab.bindings()] == [(ip, "p-vm")]
    assert lab.counters("p-evil")["drop_port_mismatch"] >= 2
    assert lab.ping("vm")


def test_mode_is_per_port(lab: SwitchLab) -> None:
    lab.attach()                                            # both VM ports enforce
    lab.attach(mode="observe", untrusted=["evil"])          # then only evil observes
    vm_mac, evil_mac = lab.mac(lab.vms["vm"]), lab.mac(lab.vms["evil"])
    assert not probe(lab, "vm", vm_mac, f"{NET}.98")
    assert probe(lab, "evil", evil_mac, f"{NET}.99")
    assert lab.counters("p-evil")["observed"] >= 1
    assert lab.counters("p-vm").get("observed", 0) == 0
