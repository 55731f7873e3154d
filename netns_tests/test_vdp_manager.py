"""VDP drives a real migration: lldpad stations on both hypervisor hosts, ``xfer vdp serve`` on
each host's first device, the real manager and agents of the manager lab.

The source host's station announces the VM leaving (S-bit); the source firewall's
responder sends "out" from hv-src to the manager over mutual TLS, which deposits the
VM's state from the source devices in its store. The VM moves; the destination
host's station announces it (M-bit); the destination switch's responder sends "in"
to hv-dst and the manager imports the stored state there. The server speaks first
after the move (tcp_loose=0 at the destination): the connection survives only if the
conntrack entries moved.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.manager_helpers import bindings, conntrack_has_vm, conversation, needs_all_kinds, running_lab
from netns_tests.vdp_lab import STATION_PORT, Responder, Station, needs_lldpad
from xfer.lab.manager_lab import DESTINATION, SOURCE, VM_MAC, ManagerLab
from xfer.lab.topology import VM_IP
from xfer.lab.traffic import conversation_continues

pytestmark = [needs_all_kinds, needs_lldpad]

VSI = "a1b2c3d4-0000-4000-8000-0000000000a1"


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    yield from running_lab(monkeypatch)


def _station_on(lab: ManagerLab, device: str, short: str, tmp_path: Path) -> Station:
    """A hypervisor host namespace whose uplink ``s0`` is port ``hv0`` of ``device``."""
    ns = lab.hosts.add(short)
    lab.hosts.veth(ns, STATION_PORT, lab.ns[device], "hv0")
    return Station(lab.hosts, ns, tmp_path)


def test_vdp_hints_move_the_vms_state_through_the_real_manager(lab: ManagerLab, tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(f'[vm.vm1]\nmac = "{VM_MAC}"\nvsi = "{VSI}"\n')
    tls = lab.client_args()         # --manager URL --ca --cert --key: mutual TLS, as a device would
    src_host = _station_on(lab, "fwsrc", "hsrc", tmp_path)
    dst_host = _station_on(lab, "swdst", "hdst", tmp_path)
    src_vdp = Responder(lab.hosts, lab.ns["fwsrc"], tmp_path, *tls, inventory=inventory, name="vdp-src",
                        server=SOURCE, port="hv0", run_in=lab.ns["mg"])
    dst_vdp = Responder(lab.hosts, lab.ns["swdst"], tmp_path, *tls, inventory=inventory, name="vdp-dst",
                        server=DESTINATION, port="hv0", run_in=lab.ns["mg"])
    src_host.wait_usable()
    dst_host.wait_usable()

    vm, srv = conversation(lab)
    # The source host: the VM is suspended and leaves (a fresh VSI created with the S-bit).
    answer = src_host.request(VSI, VM_MAC, hints="from")
    assert answer.answered and answer.mode == "assoc", (answer.output, src_vdp.err.read_text())
    (out,) = src_vdp.messages()
    assert (out["vm"], out["direction"], out["source"]) == ("vm1", "out", SOURCE)

    lab.move_vm()
    # The destination host: the VM arrives (M-bit); the manager imports what the "out" stored.
    answer = dst_host.request(VSI, VM_MAC, hints="to")
    assert answer.answered and answer.mode == "assoc", (answer.output, dst_vdp.err.read_text())
    (into,) = dst_vdp.messages()
    assert (into["vm"], into["direction"], into["destination"]) == ("vm1", "in", DESTINATION)

    assert conntrack_has_vm(lab, "fwdst") and bindings(lab, "swdst") == [VM_IP]
    assert conversation_continues(vm, srv, "after-migration"), "the connection died"
    (event,) = dst_vdp.logs("event")
    assert event["status"] == 0
    # The source host leaves for good: its de-association repeats the S-bit, no second "out".
    assert src_host.request(VSI, VM_MAC, mode="deassoc", hints="from").mode == "deassoc"
    assert len(src_vdp.messages()) == 1
    src_vdp.stop()
    dst_vdp.stop()
