"""The manager moves ``rules`` like any other kind: both firewalls list it in the topology,
the source firewall's rule for the VM reaches the destination firewall in the same
migration as its connections, and the source forgets it once the destination committed."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from netns_tests.manager_helpers import needs_all_kinds, running_lab
from xfer.lab.manager_lab import ManagerLab
from xfer.lab.topology import VM_IP
from xfer.lab.traffic import Peer

pytestmark = needs_all_kinds
PORT = 5302


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    yield from running_lab(monkeypatch, rules=True)


def new_tcp_passes(lab: ManagerLab) -> bool:
    listener = Peer(lab.hosts, lab.ns["vm"], "tcp-listen", str(PORT))
    try:
        assert listener.expect("ready")
        return lab.hosts.run(lab.ns["srv"], ["nc", "-z", "-w", "2", VM_IP, str(PORT)]).returncode == 0
    finally:
        listener.proc.kill()
        listener.proc.wait()


def vm_rules(lab: ManagerLab, ns: str) -> list[dict[str, object]]:
    objs = json.loads(lab.hosts.check(lab.ns[ns], ["nft", "-j", "list", "chain", "inet", "xfer", "inbound"]))
    return [o["rule"] for o in objs["nftables"] if "rule" in o]


@pytest.mark.parametrize("mode", ["relay", "pull"])
def test_the_manager_moves_the_vms_rules(lab: ManagerLab, mode: str) -> None:
    lab.hosts.check(lab.ns["fwsrc"], ["nft", "add", "rule", "inet", "xfer", "inbound", "ip", "daddr", VM_IP,
                                      "tcp", "dport", str(PORT), "ct", "state", "new", "accept"])
    assert new_tcp_passes(lab), "the rule on fw-src does not let the connection in"
    report = lab.migrate(mode)
    assert report["state"] == "committed" and report["missing"] == {}, report
    assert len(vm_rules(lab, "fwdst")) == 1
    lab.move_vm()
    assert new_tcp_passes(lab), "fw-dst drops the connection: the rule did not move"
    record = lab.wait_outcome(report["migration"])
    assert record["outcome"] == "cleaned", record
    assert vm_rules(lab, "fwsrc") == [], "the source kept the VM's rule after the commit"


def test_without_the_rules_the_destination_drops_the_new_connection(lab: ManagerLab) -> None:
    lab.hosts.check(lab.ns["fwsrc"], ["nft", "add", "rule", "inet", "xfer", "inbound", "ip", "daddr", VM_IP,
                                      "tcp", "dport", str(PORT), "ct", "state", "new", "accept"])
    report = lab.migrate("relay", "--kinds", "conntrack,dhcp,counters")
    assert report["state"] == "committed", report
    lab.move_vm()
    assert not new_tcp_passes(lab), "fw-dst lets the connection in without the rule: nothing is proven"
