"""The manager moves a VM's state along the lab's uplink paths, in every mode.

Source path: a firewall that also snoops DHCP and counts (fw-src), then a router
that holds nothing. Destination path: a snooping switch (sw-dst), then a
firewall that counts (fw-dst). Agents and the manager run as processes; the
operator's ``xfer migrate`` talks to the manager over mutual TLS. After the move
the server speaks first with tcp_loose=0 at the destination: the connection
survives only if conntrack reached fw-dst; the VM's packets pass the switch's
source guard only if its binding reached sw-dst; its counters continue at
fw-dst from where fw-src left them. The source is cleaned only after every
destination committed (journal order), and only then.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from netns_tests.manager_helpers import (
    assert_cleaned_after_commit,
    bindings,
    conntrack_has_vm,
    conversation,
    counters,
    needs_all_kinds,
    running_lab,
)
from xfer.lab.manager_lab import (
    AGENT_IPS,
    DESTINATION,
    MANAGER_IP,
    MCAST_GROUP,
    MCAST_PORT,
    SOURCE,
    UDP_PORT,
    ManagerLab,
)
from xfer.lab.topology import VM_IP
from xfer.lab.traffic import conversation_continues

pytestmark = needs_all_kinds


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    yield from running_lab(monkeypatch)


@pytest.mark.parametrize("mode", ["relay", "pull", "push", "store"])
def test_every_mode_moves_connection_binding_and_counters(lab: ManagerLab, mode: str) -> None:
    vm, srv = conversation(lab)
    before = counters(lab, "fwsrc")
    assert before and before["tx_packets"] > 0

    report = lab.migrate(mode)   # store mode: the CLI sends "out" then "in", as the hook does
    assert report["state"] == "committed" and report["mode"] == mode, report
    assert report["missing"] == {} and isinstance(report["over_budget"], bool)
    if mode == "store":
        assert [m["state"] for m in report["messages"]] == ["stored", "committed"]
    # Destination state, witnessed by conntrack(8) and the CLI.
    assert conntrack_has_vm(lab, "fwdst")
    assert bindings(lab, "swdst") == [VM_IP]
    assert counters(lab, "fwdst") == before, "counters did not arrive as the source held them"

    lab.move_vm()
    assert conversation_continues(vm, srv, "after-move"), "the connection died"
    after = counters(lab, "fwdst")
    assert after and after["tx_packets"] > before["tx_packets"], "counters did not continue"

    record = lab.wait_outcome(report["migration"])
    assert record["outcome"] == "cleaned", record
    assert_cleaned_after_commit(record)
    assert not conntrack_has_vm(lab, "fwsrc") and bindings(lab, "fwsrc") == []
    assert counters(lab, "fwsrc") is None
    log = lab.manager.log_text() if lab.manager else ""
    assert "Traceback" not in log and '"outcome":"ok"' in log


def test_without_a_migration_the_vm_is_cut_off(lab: ManagerLab) -> None:
    """The control: nothing moved, the destination drops the VM (guard) and the server (firewall)."""
    vm, srv = conversation(lab)
    lab.move_vm()
    assert not conversation_continues(vm, srv, "after-move", timeout=2)


def test_clear_errors_for_unknown_vm_and_server(lab: ManagerLab) -> None:
    base = ["--mode", "relay", *lab.client_args()]
    out = lab.xfer("migrate", "ghost", "--from", SOURCE, "--to", DESTINATION, *base)
    assert out.returncode == 1 and "unknown VM 'ghost'" in out.stderr, out.stderr
    out = lab.xfer("migrate", "vm1", "--from", SOURCE, "--to", "hv-nowhere", *base)
    assert out.returncode == 1 and "unknown server 'hv-nowhere'" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    # Nothing moved, nothing journaled as under way.
    assert not conntrack_has_vm(lab, "fwdst") and bindings(lab, "swdst") == []
    # A client without a certificate is refused by the manager.
    out = lab.xfer("migrate", "vm1", "--from", SOURCE, "--to", DESTINATION, "--manager", lab.url,
                   "--ca", str(lab.workdir / "pki/ca.pem"))
    assert out.returncode == 1 and bindings(lab, "swdst") == []


@pytest.mark.parametrize("transport", ["udp", "multicast"])
def test_a_datagram_from_a_device_drives_the_migration(lab: ManagerLab, transport: str) -> None:
    """The device-driven variant: the message is one datagram sent from the source firewall's
    management address, to the manager or to the lab's multicast group; the answer comes back."""
    vm, srv = conversation(lab)
    target = f"{MANAGER_IP}:{UDP_PORT}" if transport == "udp" else f"{MCAST_GROUP}:{MCAST_PORT}"
    out = lab.xfer("notify", "--vm", "vm1", "--indication", "not-running", "--direction", "out",
                   "--from", SOURCE, "--to", DESTINATION, "--mode", "push", "--udp", target,
                   "--interface", AGENT_IPS["fw-src"], "--json", ns="fwsrc")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "committed"
    lab.move_vm()
    assert conversation_continues(vm, srv, "after-move"), "the connection died"
    assert bindings(lab, "swdst") == [VM_IP]
