"""Agents move every kind at once: conntrack, counters and (where built) the DHCP binding.

Both firewalls run the counters program and, where this build has it, the DHCP
snooper (IP source guard, enforcing) on the VM-facing port ``vm0``; the VM has
a static binding at the source. After the move the destination's guard drops
the VM's packets unless its binding arrived, and its firewall drops the
server's unless the conntrack entry arrived: the live TCP connection (server
first, tcp_loose=0) survives only when the agents moved both. The counters
arrive as the source held them. Witnesses: ``xfer counters show`` and
``xfer dhcp bindings`` run as separate processes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns_tests.lab_helpers import strict_destination, tcp_conversation, xfer
from xfer.lab.agents import (
    DST_AGENT_IP,
    SRC_AGENT_IP,
    XFER,
    AgentProcess,
    LabAgents,
    device_toml,
    kind_available,
    unpin,
)
from xfer.lab.topology import SERVICE_IP, VM_IP, Lab
from xfer.lab.traffic import conversation_continues

pytest.importorskip("xfer.counters.device", reason="counters are not in this build")
HAVE_DHCP = kind_available("xfer.dhcp.device")
KINDS = ["conntrack", "counters", *(["dhcp"] if HAVE_DHCP else [])]
DEVICE = device_toml(["vm0"], *(("up0", ["vm0"]) if HAVE_DHCP else ()))


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


def _before_move(lab: Lab, agents: LabAgents) -> tuple[AgentProcess, str]:
    src = agents.start("fw-src", lab.fwsrc, SRC_AGENT_IP, KINDS, extra=DEVICE)
    mac = _vm_mac(lab)
    if HAVE_DHCP:
        from xfer.dhcp.device import add_static
        from xfer.dhcp.model import Binding

        add_static(lab.fwsrc, Binding(mac, VM_IP, None, "vm0", source="static"))
    return src, mac


def _push(lab: Lab, agents: LabAgents, src: AgentProcess, dst: AgentProcess, vm: str,
          kinds: list[str]) -> dict[str, int]:
    out = lab.hosts.run(lab.fwsrc, [*XFER, "agent", "push", *agents.client_args(src.url), "--vm", vm,
                                    "--kinds", ",".join(kinds), "--to", dst.url, "--json"], timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout)["exported"])


def test_push_moves_every_kind_and_the_connection_survives(lab: tuple[Lab, LabAgents]) -> None:
    lab_, agents = lab
    strict_destination(lab_, loose=False)
    src, mac = _before_move(lab_, agents)
    vm, srv = tcp_conversation(lab_, SERVICE_IP)
    before = _counters(lab_.fwsrc, mac)
    assert before["tx_packets"] > 0 and before["rx_packets"] > 0

    # The VM is paused: its port moves, the destination comes up (attaching to it), push.
    lab_.move_vm()
    dst = agents.start("fw-dst", lab_.fwdst, DST_AGENT_IP, KINDS, extra=DEVICE)
    moved = _push(lab_, agents, src, dst, f"{VM_IP},{mac}", KINDS)
    assert moved["counters"] == 1 and moved["conntrack"] >= 1
    if HAVE_DHCP:
        assert moved["dhcp"] == 1 and [b["ip"] for b in _bindings(lab_.fwdst)] == [VM_IP]
    assert _counters(lab_.fwdst, mac) == before, "counters did not arrive as the source held them"
    assert conversation_continues(vm, srv, "after-move"), "the connection died"
    assert _counters(lab_.fwdst, mac)["tx_packets"] > before["tx_packets"]
    # The source kept everything (it deletes only when told to).
    assert _counters(lab_.fwsrc, mac) == before
    status = json.loads(lab_.hosts.check(lab_.fwdst, [*XFER, "agent", "status",
                                                      *agents.client_args(dst.url), "--json"]))
    assert status["counts"]["counters"] >= 1  # (MAC, IP) rows: IPv6 neighbour traffic may add one
    if HAVE_DHCP:
        assert status["counts"]["dhcp"] == 1
    for agent in (src, dst):
        assert "Traceback" not in agent.log_text() and "failed" not in agent.log_text()
        assert '"event":"attached"' in agent.log_text()


@pytest.mark.skipif(not HAVE_DHCP, reason="DHCP snooping is not in this build")
def test_without_its_binding_the_guard_drops_the_vm(lab: tuple[Lab, LabAgents]) -> None:
    """The control: conntrack alone moved, the destination's source guard stops the VM."""
    lab_, agents = lab
    strict_destination(lab_, loose=False)
    src, mac = _before_move(lab_, agents)
    vm, srv = tcp_conversation(lab_, SERVICE_IP)
    lab_.move_vm()
    dst = agents.start("fw-dst", lab_.fwdst, DST_AGENT_IP, KINDS, extra=DEVICE)
    _push(lab_, agents, src, dst, f"{VM_IP},{mac}", ["conntrack"])
    assert _bindings(lab_.fwdst) == []
    assert not conversation_continues(vm, srv, "after-move"), \
        "the destination's source guard let the VM through without its binding"
