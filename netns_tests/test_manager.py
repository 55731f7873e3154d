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
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xfer.lab.agents import kind_available
from xfer.lab.manager_lab import DESTINATION, SOURCE, VM_MAC, ManagerLab
from xfer.lab.topology import SERVICE_IP, VM_IP
from xfer.lab.traffic import Peer, conversation_continues

pytestmark = pytest.mark.skipif(
    not (kind_available("xfer.ebpf.counters_device") and kind_available("xfer.dhcpsnoop.device")),
    reason="counters or DHCP snooping are not in this build")
TRANSFER_PHASES = ("export", "import", "push", "pull")


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagerLab]:
    with tempfile.TemporaryDirectory(prefix="xfer-manager-") as tmp:
        # Snooping databases in the temp dir (agents inherit the environment).
        monkeypatch.setenv("XFER_DHCP_STATE_DIR", str(Path(tmp) / "dhcp"))
        with ManagerLab(f"m{os.getpid() % 10000}", Path(tmp)) as lab:
            lab.up()
            lab.start_agents()
            lab.start_manager()
            lab.hosts.sysctl(lab.ns["fwdst"], "net/netfilter/nf_conntrack_tcp_loose", "0")
            lab.hosts.sysctl(lab.ns["fwdst"], "net/netfilter/nf_conntrack_tcp_be_liberal", "0")
            yield lab


def conversation(lab: ManagerLab) -> tuple[Peer, Peer]:
    srv = Peer(lab.hosts, lab.ns["srv"], "tcp-listen", "7000")
    assert srv.expect("ready")
    vm = Peer(lab.hosts, lab.ns["vm"], "tcp-connect", SERVICE_IP, "7000")
    assert vm.expect("connected"), "the VM could not connect through the source path"
    assert conversation_continues(vm, srv, "before"), "no conversation through the source path"
    return vm, srv


def counters(lab: ManagerLab, ns: str) -> dict[str, int] | None:
    out = lab.xfer("counters", "show", "--netns", lab.ns[ns], "--json")
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r["mac"] == VM_MAC and r["ip"] == VM_IP]
    return {k: v for k, v in rows[0].items() if k not in ("mac", "ip")} if rows else None


def bindings(lab: ManagerLab, ns: str) -> list[str]:
    out = lab.xfer("dhcp", "bindings", "--netns", lab.ns[ns], "--json")
    assert out.returncode == 0, out.stderr
    return [b["ip"] for b in json.loads(out.stdout)]


def conntrack_has_vm(lab: ManagerLab, ns: str) -> bool:
    """conntrack(8) as the independent witness."""
    return VM_IP in lab.hosts.run(lab.ns[ns], ["conntrack", "-L", "-s", VM_IP]).stdout


def assert_cleaned_after_commit(record: dict[str, Any]) -> None:
    transfer = [p for p in record["phases"] if p["name"] in TRANSFER_PHASES]
    cleanup = [p for p in record["phases"] if p["name"] == "cleanup"]
    assert transfer and cleanup and all(p["outcome"] == "ok" for p in record["phases"]), record
    assert min(p["started"] for p in cleanup) >= max(p["ended"] for p in transfer), \
        "the source was cleaned before every destination had committed"


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
