"""Malformed DHCP neither crashes the datapath nor creates bindings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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
)
from xfer.dhcp import packet
from xfer.lab.hosts import Hosts

IP = f"{NET}.60"


@pytest.fixture
def lab(hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SwitchLab]:
    with switches(hosts, tmp_path, monkeypatch, ("sw", ("vm",))) as (built,):
        built.attach()
        yield built


def _ack(mac: str, **kw: object) -> bytes:
    args: dict[str, object] = {"yiaddr": IP, "lease": 300, "server": SERVER_IP}
    args.update(kw)
    return packet.build(2, packet.ACK, mac, **args)  # type: ignore[arg-type]


Mangle = Callable[[str, str], bytes]     # (server MAC, client MAC) -> frame

MALFORMED: dict[str, Mangle] = {
    "truncated options": lambda s, c: server_frame(s, c, _ack(c)[:-3]),
    "no END": lambda s, c: server_frame(s, c, _ack(c, end=False)),
    "option length past the end": lambda s, c: server_frame(
        s, c, _ack(c)[:240] + b"\x35\x01\x05\x33\xf0\0\0\x01\x2c\xff"),
    "lease of 2 bytes": lambda s, c: server_frame(
        s, c, _ack(c, lease=None, extra=[(51, b"\x01\x2c")])),
    "type of 2 bytes": lambda s, c: server_frame(
        s, c, packet.build(2, None, c, yiaddr=IP, lease=300, extra=[(53, b"\x05\x05")])),
    "option overload": lambda s, c: server_frame(s, c, _ack(c, extra=[(52, b"\x03")])),
    "UDP length beyond the packet": lambda s, c: server_frame(s, c, _ack(c), udp_len=2000),
    "UDP length too short": lambda s, c: server_frame(s, c, _ack(c), udp_len=100),
    "UDP length under its header": lambda s, c: server_frame(s, c, _ack(c), udp_len=3),
    "no magic cookie": lambda s, c: server_frame(s, c, _ack(c)[:236] + b"\0\0\0\0"
                                                 + _ack(c)[240:]),
    "fixed header cut short": lambda s, c: server_frame(s, c, _ack(c)[:100]),
    "hlen 16": lambda s, c: server_frame(s, c, _ack(c)[:2] + b"\x10" + _ack(c)[3:]),
    "too many options": lambda s, c: server_frame(
        s, c, _ack(c, extra=[(12, b"h")] * 70)),
    "frame cut inside the UDP header": lambda s, c: server_frame(s, c, _ack(c))[:14 + 20 + 4],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_server_message_creates_no_binding(lab: SwitchLab, name: str) -> None:
    vm_wire, srv_wire = Wire(lab.vms["vm"], "eth0"), Wire(lab.srv, "eth0")
    try:
        mac = vm_wire.mac
        vm_wire.send(client_frame(mac, packet.build(1, packet.REQUEST, mac, requested=IP)))
        time.sleep(0.05)
        srv_wire.send(MALFORMED[name](srv_wire.mac, mac))
        time.sleep(0.1)
        assert lab.bindings() == []
        # the program is alive and still parses: a valid ACK binds
        srv_wire.send(server_frame(srv_wire.mac, mac, _ack(mac)))
        time.sleep(0.1)
        assert [r["ip"] for r in lab.bindings()] == [IP]
    finally:
        vm_wire.close()
        srv_wire.close()


def test_malformed_client_messages_change_nothing(lab: SwitchLab) -> None:
    lab.crafted_lease("vm", IP, 300)
    vm_wire = Wire(lab.vms["vm"], "eth0")
    try:
        mac = vm_wire.mac
        release = packet.build(1, packet.RELEASE, mac, ciaddr=IP)
        for frame in (
            client_frame(mac, release[:-2], src=IP, dst=SERVER_IP),        # truncated
            client_frame(mac, release, src=IP, dst=SERVER_IP, udp_len=5000),
            client_frame(mac, release + b"", src=IP, dst=SERVER_IP)[:60],  # cut frame
            client_frame(mac, release[:240] + b"\x35\x09\x07\xff", src=IP, dst=SERVER_IP),
        ):
            vm_wire.send(frame)
        # a RELEASE for the VM's binding sent by someone else's MAC is refused outright
        vm_wire.send(client_frame("02:de:ad:be:ef:03", release, src=IP, dst=SERVER_IP))
        time.sleep(0.1)
        assert [r["ip"] for r in lab.bindings()] == [IP]
        assert lab.ping("vm")
        assert lab.counters("p-vm")["malformed"] >= 3
    finally:
        vm_wire.close()
