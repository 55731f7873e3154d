"""Pre-copy on the lab, device side: the source's tracker and the destination's stage.

Flows churn while the VM runs (new, closed, TCP state changes, UDP refreshes, a
NATed flow, a marked and labelled flow); after the last delta the destination
holds exactly the source's entries of the VM, read with conntrack(8); live TCP
conversations opened before and during pre-copy survive the move with the server
speaking first and tcp_loose=0; an abort leaves none of the VM's entries.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from netns_tests.lab_helpers import nft_counter, strict_destination
from netns_tests.precopy_helpers import (
    NAT_HOST,
    Flows,
    check_same_entries,
    close_tcp,
    mark_rule,
    open_tcp,
    open_udp,
    refresh_udp,
    vm_entries,
    vm_labels,
)
from xfer.conntrack.staging import Stage
from xfer.conntrack.tracker import Tracker
from xfer.lab.topology import VM_IP, VM_IP6, Lab
from xfer.lab.traffic import conversation_continues
from xfer.model import parse_vm

VM = parse_vm(f"{VM_IP},{VM_IP6}")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(f"p{os.getpid() % 10000}") as lab:
        lab.up()
        strict_destination(lab, loose=False)
        yield lab


def test_churn_during_precopy_ends_with_identical_tables(lab: Lab) -> None:
    flows = Flows()
    mark_rule(lab, 7201)
    # opened before pre-copy starts (before the listener: the tracker must re-read them)
    open_tcp(lab, flows, "before", 7100)
    open_tcp(lab, flows, "closing", 7101)
    open_tcp(lab, flows, "nat", 7102, NAT_HOST)
    open_udp(lab, flows, "udp", 7103)
    with Tracker(lab.fwsrc) as tracker, Stage(VM, lab.fwdst) as stage:
        tracker.track([VM])
        tracker.start()
        bulk, cursor = tracker.snapshot(VM.id)
        stage.apply(bulk)
        # the VM runs on: churn, one delta round, churn again
        open_tcp(lab, flows, "during", 7200)
        open_tcp(lab, flows, "marked", 7201)
        close_tcp(flows, "closing")
        refresh_udp(flows, "udp")
        delta = tracker.changes(VM.id, cursor)
        stage.apply(delta.upserts, delta.deletes)
        cursor = delta.cursor
        open_tcp(lab, flows, "late", 7202, NAT_HOST)
        open_udp(lab, flows, "udp-late", 7203)
        # the pause: the VM sends nothing; only the last delta moves
        last = tracker.changes(VM.id, cursor)
        stage.apply(last.upserts, last.deletes, final=True)
        source = vm_entries(lab, lab.fwsrc)
        assert any("TIME_WAIT" in k or "FIN_WAIT" in k or "LAST_ACK" in k or "CLOSE" in k
                   for k in source), source
        assert any("mark=42" in k for k in source), source
        assert any(labels for labels in vm_labels(lab.fwsrc).values())
        assert any("10.0.8.1" in k for k in source), source  # the NATed flows
        check_same_entries(lab, source)
        stage.commit()
    # the witness for labels at the destination: nft counts packets whose entry has label 5
    lab.hosts.check(lab.fwdst, ["nft", "insert", "rule", "inet", "xfer", "forward", "ct", "label",
                                "5", "counter", "name", "new_drops", "accept"])
    lab.hosts.check(lab.fwdst, ["nft", "reset", "counter", "inet", "xfer", "new_drops"])
    lab.move_vm()
    for name in ("before", "during", "marked", "late", "nat"):
        vm, srv = flows.tcp[name]
        assert conversation_continues(vm, srv, name), f"{name} did not survive the move"
    assert nft_counter(lab, lab.fwdst, "new_drops") >= 1, "label 5 did not arrive"


def test_abort_after_staging_leaves_the_destination_without_the_vms_entries(lab: Lab) -> None:
    flows = Flows()
    open_tcp(lab, flows, "one", 7100)
    open_tcp(lab, flows, "nat", 7102, NAT_HOST)
    with Tracker(lab.fwsrc) as tracker, Stage(VM, lab.fwdst) as stage:
        tracker.track([VM])
        bulk, cursor = tracker.snapshot(VM.id)
        stage.apply(bulk)
        open_tcp(lab, flows, "two", 7101)
        delta = tracker.changes(VM.id, cursor)
        stage.apply(delta.upserts, delta.deletes)
        assert len(vm_entries(lab, lab.fwdst)) == 3
        stage.abort()
    assert vm_entries(lab, lab.fwdst) == {}
    assert len(vm_entries(lab, lab.fwsrc)) == 3  # the source is never touched
