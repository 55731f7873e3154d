"""Pre-copy through the manager, in relay, pull and push modes.

``xfer migrate --prepare`` ("migrating": the VM runs on) stages the VM's conntrack
state at the destination firewall and streams changes; flows opened meanwhile
arrive too; ``xfer migrate`` ("not-running") moves only the last delta, the
destination commits, and connections opened before and during pre-copy survive
the move with the server speaking first (tcp_loose=0). The destination then holds
exactly the source's entries of the VM (conntrack(8) as witness). An abort after
``--prepare`` leaves the destination without any of the VM's entries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.manager_helpers import conntrack_has_vm, conversation, needs_all_kinds, running_lab
from xfer.lab.manager_lab import ManagerLab
from xfer.lab.topology import SERVICE_IP, VM_IP
from xfer.lab.traffic import Peer, conversation_continues

pytestmark = needs_all_kinds


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    yield from running_lab(monkeypatch)


@pytest.fixture
def privsep_lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    # every agent's network-facing process runs without capabilities, as nobody
    yield from running_lab(monkeypatch, agent_extra='\n[privsep]\nuser = "nobody"\n')


def _vm_table(lab: ManagerLab, short: str) -> list[str]:
    """The VM's entries as conntrack(8) lists them, without timeout and use count."""
    out = lab.hosts.run(lab.ns[short], ["conntrack", "-L", "-s", VM_IP]).stdout
    lines = []
    for line in out.splitlines():
        parts = line.split()
        lines.append(" ".join(p for i, p in enumerate(parts) if i != 2 and not p.startswith("use=")))
    return sorted(lines)


def _second_conversation(lab: ManagerLab) -> tuple[Peer, Peer]:
    srv = Peer(lab.hosts, lab.ns["srv"], "tcp-listen", "7001")
    assert srv.expect("ready")
    vm = Peer(lab.hosts, lab.ns["vm"], "tcp-connect", SERVICE_IP, "7001")
    assert vm.expect("connected")
    assert conversation_continues(vm, srv, "during")
    return vm, srv


@pytest.mark.parametrize("mode", ["relay", "pull", "push"])
def test_prepare_then_switch_over_moves_only_the_delta(lab: ManagerLab, mode: str) -> None:
    _prepare_then_switch_over(lab, mode)


@pytest.mark.parametrize("mode", ["relay", "pull"])
def test_with_privsep_the_helpers_track_and_stage(privsep_lab: ManagerLab, mode: str) -> None:
    # The tracker and the stages read and write ctnetlink: the privileged helpers do it.
    for agent in privsep_lab.agents.values():
        assert agent.proc is not None
        status = (Path("/proc") / str(agent.proc.pid) / "status").read_text()
        assert "CapEff:\t0000000000000000" in status, f"{agent.name} kept its capabilities"
    _prepare_then_switch_over(privsep_lab, mode)


def _prepare_then_switch_over(lab: ManagerLab, mode: str) -> None:
    before = conversation(lab)
    prepared = lab.migrate(mode, "--prepare")
    assert prepared["state"] == "prepared" and prepared["precopy"]["staged"] >= 1, prepared
    assert conntrack_has_vm(lab, "fwdst")  # staged while the VM runs at the source
    during = _second_conversation(lab)
    time.sleep(1.2)  # a round of changes or two (precopy_interval_s 0.5)
    # the pause: the VM sends nothing from here (the source is cleaned after the commit)
    source = _vm_table(lab, "fwsrc")
    assert len(source) == 2
    report = lab.migrate(mode)
    assert report["state"] == "committed", report
    assert report["precopy"]["staged"] >= 2 and report["pause_ms"] is not None, report
    assert _vm_table(lab, "fwdst") == source
    lab.move_vm()
    for name, (vm, srv) in (("before", before), ("during", during)):
        assert conversation_continues(vm, srv, f"{name}-after"), f"{name} did not survive ({mode})"
    # the pause's record is written just after the answer, out of the pause
    deadline = time.monotonic() + 5
    while True:
        rec = next(m for m in lab.migrations() if m["id"] == report["migration"])
        if rec["pause_ms"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert rec["precopy"] == report["precopy"] and rec["pause_ms"] == report["pause_ms"], rec
    prep = next(m for m in lab.migrations() if m["id"] == prepared["migration"])
    assert prep["precopy"] is not None


def test_abort_after_prepare_leaves_the_destination_clean(lab: ManagerLab) -> None:
    conversation(lab)
    prepared = lab.migrate("relay", "--prepare")
    assert conntrack_has_vm(lab, "fwdst")
    out = lab.xfer("migrate", "--abort", "vm1", *lab.client_args(), "--json")
    assert out.returncode == 0, out.stderr
    assert not conntrack_has_vm(lab, "fwdst")
    assert conntrack_has_vm(lab, "fwsrc")  # the source is never touched
    rec = next(m for m in lab.migrations() if m["id"] == prepared["migration"])
    assert rec["outcome"] == "aborted"
