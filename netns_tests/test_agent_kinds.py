"""Agents move all three kinds at once: conntrack, counters and the DHCP binding.

Both firewalls run the counters program and the DHCP snooper (IP source guard,
enforcing) on the VM-facing port ``vm0``; the VM has a static binding at the
source. After the move the destination's guard drops the VM's packets unless
its binding arrived, and its firewall drops the server's unless the conntrack
entry arrived: the live TCP connection (server first, tcp_loose=0) survives
only when the agents moved both. The counters arrive as they were at the
source. Witnesses: ``xfer counters show`` / ``xfer dhcp bindings`` run as
separate processes, and conntrack(8).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.lab_helpers import strict_destination, tcp_conversation, xfer
from xfer.lab.agents import DST_AGENT_IP, SRC_AGENT_IP, XFER, LabAgents, device_toml, unpin
from xfer.lab.topology import SERVICE_IP, VM_IP, Lab
from xfer.lab.traffic import conversation_continues

counters_device = pytest.importorskip("xfer.ebpf.counters_device", reason="counters not merged yet")
dhcp_device = pytest.importorskip("xfer.dhcpsnoop.device", reason="dhcp snooping not merged yet")
from xfer.dhcpsnoop.model import Binding  # noqa: E402

KINDS = ["conntrack", "counters", "dhcp"]
DEVICE = device_toml(["vm0"], "up0", ["vm0"])


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Lab, LabAgents]]:
    with tempfile.TemporaryDirectory(prefix="xfer-agent-kinds-") as tmp, \
            Lab(f"k{os.getpid() % 10000}") as lab:
        # The snooping database files go to the temp dir (agents inherit this).
        monkeypatch.setenv("XFER_DHCP_STATE_DIR", str(Path(tmp) / "dhcp"))
        try:
            lab.up()
            agents = LabAgents(lab.hosts, Path(tmp))
            agents.link(lab.fwsrc, lab.fwdst)
            yield lab, agents
        finally:
            lab.down()
            unpin([lab.fwsrc, lab.fwdst])


def _vm_mac(lab: Lab) -> str:
    link = json.loads(lab.hosts.check(lab.vm, ["ip", "-j", "link", "show", "eth0"]))
    return str(link[0]["address"])


def _counters(ns: str, mac: str) -> dict[str, int]:
    out = xfer("counters", "show", "--netns", ns, "--json")
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r["mac"] == mac and r["ip"] == VM_IP]
    assert len(rows) == 1, out.stdout
    return {k: v for k, v in rows[0].items() if k not in ("mac", "ip")}


def _bindings(ns: str) -> list[dict[str, object]]:
    out = xfer("dhcp", "bindings", "--netns", ns, "--json")
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


@pytest.mark.parametrize("kinds", [KINDS, ["conntrack"]], ids=["all-kinds", "conntrack-only"])
def test_push_moves_conntrack_counters_and_binding(lab: tuple[Lab, LabAgents], kinds: list[str]) -> None:
    lab_, agents = lab
    strict_destination(lab_, loose=False)
    src = agents.start("fw-src", lab_.fwsrc, SRC_AGENT_IP, KINDS, extra=DEVICE)
    mac = _vm_mac(lab_)
    dhcp_device.add_static(lab_.fwsrc, Binding(mac, VM_IP, None, "vm0", source="static"))
    vm, srv = tcp_conversation(lab_, SERVICE_IP)
    before = _counters(lab_.fwsrc, mac)
    assert before["tx_packets"] > 0 and before["rx_packets"] > 0

    # The VM is paused: move its port, bring the destination up, push.
    lab_.move_vm()
    dst = agents.start("fw-dst", lab_.fwdst, DST_AGENT_IP, KINDS, extra=DEVICE)
    vm_spec = f"{VM_IP},{mac}"
    out = lab_.hosts.run(lab_.fwsrc, [*XFER, "agent", "push", *agents.client_args(src.url),
                                       "--vm", vm_spec, "--kinds", ",".join(kinds), "--to", dst.url,
                                       "--json"], timeout=60)
    assert out.returncode == 0, out.stderr
    moved = json.loads(out.stdout)["exported"]
    assert set(moved) == set(kinds)

    if kinds == KINDS:
        assert moved == {"conntrack": moved["conntrack"], "counters": 1, "dhcp": 1}
        assert [b["ip"] for b in _bindings(lab_.fwdst)] == [VM_IP]
        assert _counters(lab_.fwdst, mac) == before, "counters did not arrive as the source held them"
        assert conversation_continues(vm, srv, "after-move"), "the connection died"
        assert _counters(lab_.fwdst, mac)["tx_packets"] > before["tx_packets"]
        # The source kept everything (it deletes only when told to).
        assert _counters(lab_.fwsrc, mac) == before and _bindings(lab_.fwsrc)
    else:
        assert _bindings(lab_.fwdst) == []
        assert not conversation_continues(vm, srv, "after-move"), \
            "the destination's source guard let the VM through without its binding"
