"""A port that takes many leases cannot exhaust the binding table (issue 12.3).

A VM-facing port is hostile: one guest can make up any number of MACs and take a
lease for each. The per-port binding limit (on by default) holds against a real
dnsmasq, a legitimate client on another port still gets its binding, and the
counters count what was stored and what was refused, nothing more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.dhcp_lab import NET, SERVER_IP, SwitchLab, Wire, client_frame, server_frame, switches
from xfer.dhcp import packet
from xfer.lab.hosts import Hosts


@pytest.fixture
def lab(hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SwitchLab]:
    with switches(hosts, tmp_path, monkeypatch, ("sw", ("vm", "evil"))) as (built,):
        yield built


def fake_mac(i: int) -> str:
    return f"02:66:00:00:{i >> 8:02x}:{i & 0xff:02x}"


def _reply(wire: Wire, xid: int, msg_type: int, timeout: float = 3.0) -> packet.DhcpInfo | None:
    """The server's reply of ``msg_type`` to transaction ``xid`` seen on ``wire``."""
    def match(frame: bytes) -> bool:
        # Ethernet 14 + IPv4 20 + UDP 8; the BOOTP xid sits at offset 4 of the payload
        if len(frame) < 42 + 240 or frame[23] != 17 or frame[36:38] != b"\x00\x44":
            return False
        if int.from_bytes(frame[46:50], "big") != xid:
            return False
        try:
            return packet.parse(frame[42:]).msg_type == msg_type
        except packet.Malformed:
            return False

    frame = wire.wait_for(match, timeout)
    return None if frame is None else packet.parse(frame[42:])


def take_leases(lab: SwitchLab, vm: str, count: int) -> list[tuple[str, str]]:
    """DISCOVER/OFFER/REQUEST/ACK with the real dnsmasq for ``count`` made-up MACs."""
    got = []
    with Wire(lab.vms[vm], "eth0") as wire:
        for i in range(count):
            mac, xid = fake_mac(i), 0x7700_0000 + i
            wire.drain()
            wire.send(client_frame(mac, packet.build(1, packet.DISCOVER, mac, xid=xid)))
            offer = _reply(wire, xid, packet.OFFER)
            assert offer is not None, f"no OFFER for client {i}"
            wire.send(client_frame(mac, packet.build(1, packet.REQUEST, mac, xid=xid,
                                                     requested=offer.yiaddr, server=SERVER_IP)))
            ack = _reply(wire, xid, packet.ACK)
            assert ack is not None, f"no ACK for client {i}"
            got.append((mac, ack.yiaddr))
    return got


def test_one_port_cannot_take_the_table_from_a_real_dhcp_server(
        lab: SwitchLab, caplog: pytest.LogCaptureFixture) -> None:
    from xfer.dhcp.serve import Snooper
    from xfer.dhcp.store import BindingTable

    lab.attach()                                    # the default limit, nothing configured
    lab.dnsmasq(lab.srv, "eth0", f"{NET}.2", f"{NET}.250", "many", lease="10m",
                extra=["--no-ping"])
    with BindingTable(lab.sw) as table:
        limit = {p.name: p.max_bindings for p in table.ports()}["p-evil"]
    assert 0 < limit < 200

    leases = take_leases(lab, "evil", 200)          # the server granted every one of them
    assert len({ip for _, ip in leases}) == 200

    rows = lab.bindings()
    evil = [r for r in rows if r["port"] == "p-evil"]
    assert len(evil) == limit                       # the port's limit held
    stored = {(r["mac"], r["ip"]) for r in evil}
    assert stored == set(leases[:limit])            # first come, first bound; no eviction
    # ACKs are counted on the port they arrive on, refusals on the client's port
    assert lab.counters("uplink")["binding_added"] == limit        # counts what was stored ...
    assert lab.counters("p-evil")["binding_refused_port_limit"] == 200 - limit  # ... and not
    with BindingTable(lab.sw) as table:
        assert {p.name: p.bindings for p in table.ports()}["p-evil"] == limit

    # the refusal is logged (by the snooper loop the agent and `xfer dhcp serve` run)
    with caplog.at_level(logging.WARNING, logger="xfer.dhcp.serve"), \
            BindingTable(lab.sw) as table:
        Snooper(lab.sw).tick(table)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, caplog.text
    assert "p-evil" in refusals[0] and f"limit of {limit}" in refusals[0]
    assert f"{200 - limit} " in refusals[0] and leases[-1][0] in refusals[0]

    # a new legitimate client on another port still gets its binding, and its traffic passes
    lab.dhclient("vm")
    ip = lab.vm_ip("vm")
    assert ip is not None
    assert any(r["port"] == "p-vm" and r["ip"] == ip for r in lab.bindings())
    assert lab.ping("vm")

    # a binding the port gives back frees a place for the next lease on that port
    mac, evil_ip = leases[0]
    with Wire(lab.vms["evil"], "eth0") as wire:
        wire.send(client_frame(mac, packet.build(1, packet.RELEASE, mac, ciaddr=evil_ip,
                                                 server=SERVER_IP), src=evil_ip, dst=SERVER_IP))
    deadline = time.monotonic() + 3
    while len([r for r in lab.bindings() if r["port"] == "p-evil"]) != limit - 1:
        assert time.monotonic() < deadline, "RELEASE did not remove the binding"
        time.sleep(0.05)
    more = take_leases(lab, "evil", 1)              # fake_mac(0) again: a new lease
    evil = {(r["mac"], r["ip"]) for r in lab.bindings() if r["port"] == "p-evil"}
    assert len(evil) == limit and more[0] in evil


def test_full_table_refuses_and_counts_only_what_was_stored(lab: SwitchLab) -> None:
    """With the port limit switched off the table's own size holds, and the counters say so."""
    from xfer.dhcp import device
    from xfer.dhcp.store import TABLE_SIZE, BindingTable

    device.attach(lab.sw, ["uplink"], ["p-vm", "p-evil"], max_bindings=0)
    extra = 50
    with Wire(lab.vms["evil"], "eth0") as vm_wire, Wire(lab.srv, "eth0") as srv_wire:
        for i in range(TABLE_SIZE + extra):
            mac, ip = fake_mac(i), f"10.{60 + (i >> 16)}.{(i >> 8) & 0xff}.{i & 0xff}"
            vm_wire.send(client_frame(mac, packet.build(1, packet.REQUEST, mac, requested=ip)))
            srv_wire.send(server_frame(srv_wire.mac, mac, packet.build(
                2, packet.ACK, mac, yiaddr=ip, lease=600, server=SERVER_IP)))
    time.sleep(0.2)
    with BindingTable(lab.sw) as table:
        stored = len(table.bindings())
        usage = {p.name: p.bindings for p in table.ports()}
    assert stored == TABLE_SIZE
    assert usage["p-evil"] == TABLE_SIZE
    assert lab.counters("uplink")["binding_added"] == TABLE_SIZE
    refused = lab.counters("p-evil")
    assert refused["binding_refused_table_full"] == extra
    assert "binding_refused_port_limit" not in refused
