"""A VM's binding moves from switch A to switch B with the VM (export/import, --kinds dhcp)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.dhcp_lab import NET, SwitchLab, switches
from xfer import transfer
from xfer.bundle import Bundle, Section
from xfer.dhcp.model import Binding
from xfer.dhcp.store import BindingTable
from xfer.dhcp.transfer import ENCODING
from xfer.errors import ForeignEntryError
from xfer.lab.hosts import Hosts
from xfer.model import Kind, VmIdentity


@pytest.fixture
def two(hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> Iterator[tuple[SwitchLab, SwitchLab]]:
    with switches(hosts, tmp_path, monkeypatch, ("a", ("vm",)), ("b", ())) as (a, b):
        yield a, b


def replug(a: SwitchLab, b: SwitchLab, mac: str, ip: str) -> None:
    """The hypervisor's part of a migration: the VM's NIC now hangs off switch B."""
    h, vm = a.hosts, a.vms["vm"]
    h.check(a.sw, ["ip", "link", "del", "dev", "p-vm"])
    h.veth(b.sw, "p-vm", vm, "eth0")
    h.check(vm, ["ip", "link", "set", "dev", "eth0", "address", mac])
    h.check(vm, ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
    h.check(b.sw, ["ip", "link", "set", "dev", "p-vm", "master", "br0"])
    b.vms["vm"] = vm


def test_binding_moves_with_the_vm(two: tuple[SwitchLab, SwitchLab], tmp_path: Path) -> None:
    a, b = two
    a.attach()
    a.dnsmasq(a.srv, "eth0", f"{NET}.100", f"{NET}.150", "real")
    client = a.dhclient("vm")
    ip, mac = a.vm_ip("vm"), a.mac(a.vms["vm"])
    assert ip and a.ping("vm")
    a.stop_processes()          # the VM is paused: its dhclient sends nothing more
    assert client.poll() is not None

    replug(a, b, mac, ip)
    b.attach(untrusted=["vm"])
    assert not b.ping("vm")     # control: B has no binding, its source guard drops the VM

    bundle_file = tmp_path / "vm.xfer"
    a.xfer("export", "--vm", f"{mac},{ip}", "--kinds", "dhcp", "--netns", a.sw,
           "--out", str(bundle_file))
    report = json.loads(b.xfer("import", str(bundle_file), "--netns", b.sw, "--json").stdout)
    assert report["created"] == 1 and report["failed"] == 0
    assert b.ping("vm")         # at once: the first packet after the import passes

    rows = b.bindings()
    assert [(r["mac"], r["ip"], r["port"]) for r in rows] == [(mac, ip, "p-vm")]
    assert 90 < float(rows[0]["lease_remaining"]) <= 120    # type: ignore[arg-type]

    a.xfer("forget", "--vm", f"{mac},{ip}", "--kinds", "dhcp", "--netns", a.sw)
    assert a.bindings() == []


def test_foreign_bindings_are_refused_and_nothing_changes(two: tuple[SwitchLab, SwitchLab],
                                                         tmp_path: Path) -> None:
    _, b = two
    b.hosts.check(b.sw, ["ip", "link", "add", "p-x", "type", "veth", "peer", "name", "p-x2"])
    b.hosts.link_up(b.sw, "p-x")
    b.attach(untrusted=["x"])
    vm = VmIdentity("vm", macs=("02:00:00:00:00:02",), ipv4=(f"{NET}.2",))
    records = [Binding("02:00:00:00:00:02", f"{NET}.2", 60.0, "p-x").to_json(),
               Binding("02:00:00:00:00:03", f"{NET}.3", 60.0, "p-x").to_json()]
    section = Section(Kind.DHCP, ENCODING, 2, json.dumps(records).encode())
    with pytest.raises(ForeignEntryError):
        transfer.import_bundle(Bundle(vm, {}, {Kind.DHCP: section}), b.sw)
    with BindingTable(b.sw) as table:
        assert table.bindings() == []

    # the CLI says so in one line and exits 1
    from xfer import bundle as bundle_mod

    path = tmp_path / "foreign.xfer"
    bundle_mod.write(path, Bundle(vm, {}, {Kind.DHCP: section}))
    proc = b.xfer("import", str(path), "--netns", b.sw, check=False)
    assert proc.returncode == 1 and "does not belong" in proc.stderr
    assert b.bindings() == []


@pytest.fixture
def wide(hosts: Hosts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SwitchLab]:
    with switches(hosts, tmp_path, monkeypatch, ("w", ("vm", "evil"))) as (built,):
        yield built


def test_unknown_port_is_pinned_by_the_vms_first_packet(wide: SwitchLab) -> None:
    wide.attach()
    mac, ip = wide.mac(wide.vms["vm"]), f"{NET}.33"
    vm = VmIdentity("vm", macs=(mac,), ipv4=(ip,))
    records = [Binding(mac, ip, 60.0, "eth7").to_json()]   # the source's port name
    section = Section(Kind.DHCP, ENCODING, 1, json.dumps(records).encode())
    report = transfer.import_bundle(Bundle(vm, {}, {Kind.DHCP: section}), wide.sw)
    assert "any untrusted port" in report.kinds[Kind.DHCP].warnings[0]
    assert wide.bindings()[0]["port"] is None

    wide.set_ip("vm", ip)
    assert wide.ping("vm")                                  # first packet pins p-vm
    assert wide.bindings()[0]["port"] == "p-vm"
    # the other VM now cannot take the address over, even with the right MAC
    wide.hosts.check(wide.vms["evil"], ["ip", "link", "set", "dev", "eth0", "address", mac])
    wide.set_ip("evil", ip)
    assert not wide.ping("evil")
    dropped = wide.counters("p-evil")
    assert dropped.get("drop_arp", 0) + dropped.get("drop_source", 0) >= 1
