"""Shared pieces of the manager's kernel tests: the lab fixture and the witnesses."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xfer.lab.agents import kind_available
from xfer.lab.manager_lab import VM_MAC, ManagerLab
from xfer.lab.topology import SERVICE_IP, VM_IP
from xfer.lab.traffic import Peer, conversation_continues

# The lab's devices hold every kind: a build without counters or DHCP snooping cannot run it.
needs_all_kinds = pytest.mark.skipif(
    not (kind_available("xfer.counters.device") and kind_available("xfer.dhcp.device")),
    reason="counters or DHCP snooping are not in this build")
# Device operations that move state (the device-driven variant's deposit and collect included).
TRANSFER_PHASES = ("export", "import", "push", "pull", "deposit", "collect")


def running_lab(monkeypatch: pytest.MonkeyPatch, **options: Any) -> Iterator[ManagerLab]:
    """The body of each test module's ``lab`` fixture: the lab up, agents and manager running.

    ``options``: the manager's ``store_ttl_s`` and ``device_timeout_s``, the agents'
    ``agent_extra``."""
    with tempfile.TemporaryDirectory(prefix="xfer-manager-") as tmp:
        Path(tmp).chmod(0o711)      # agents with [privsep] reach their journals as another user
        # Snooping databases in the temp dir (agents inherit the environment).
        monkeypatch.setenv("XFER_DHCP_STATE_DIR", str(Path(tmp) / "dhcp"))
        with ManagerLab(f"m{os.getpid() % 10000}", Path(tmp), **options) as lab:
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
