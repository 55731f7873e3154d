"""Agents as separate processes in the lab's firewall namespaces, over mutual TLS.

A live TCP connection survives the move when the agents moved its conntrack
state (export+import, push, pull), discriminating as the conntrack lab tests are:
after the move the server speaks first, and tcp_loose=0 on the destination.
conntrack(8) is the witness of what each firewall holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netns_tests.lab_helpers import conntrack_list, strict_destination, tcp_conversation
from xfer.lab.agents import DST_AGENT_IP, SRC_AGENT_IP, XFER, AgentProcess, LabAgents
from xfer.lab.topology import SERVICE_IP, VM_IP, VM_IP6, Lab
from xfer.lab.traffic import conversation_continues

VM = f"{VM_IP},{VM_IP6}"


@dataclass
class AgentLab:
    lab: Lab
    agents: LabAgents
    src: AgentProcess
    dst: AgentProcess

    def cli(self, ns: str, verb: str, url: str, *args: str, name: str = "operator",
            ca: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``xfer agent VERB`` as an operator would run it, from inside ``ns``."""
        return self.lab.hosts.run(ns, [*XFER, "agent", verb, *self.agents.client_args(url, name, ca),
                                       *args], timeout=120)


@pytest.fixture
def alab() -> Iterator[AgentLab]:
    with tempfile.TemporaryDirectory(prefix="xfer-agent-test-") as tmp, \
            Lab(f"a{os.getpid() % 10000}") as lab:
        lab.up()
        agents = LabAgents(lab.hosts, Path(tmp))
        agents.link(lab.fwsrc, lab.fwdst)
        src = agents.start("fw-src", lab.fwsrc, SRC_AGENT_IP, ["conntrack"])
        dst = agents.start("fw-dst", lab.fwdst, DST_AGENT_IP, ["conntrack"],
                           metrics=f"{DST_AGENT_IP}:9464")
        yield AgentLab(lab, agents, src, dst)


def _vm_entries(alab: AgentLab, ns: str) -> list[str]:
    """The VM's entries as conntrack(8) lists them, without the ticking timeout column."""
    return sorted(re.sub(r"^(\S+\s+\d+\s+)\d+", r"\1", line)
                  for line in conntrack_list(alab.lab, ns).splitlines() if VM_IP in line)


def _move(alab: AgentLab, mode: str, tmp: Path) -> None:
    lab, src, dst = alab.lab, alab.src, alab.dst
    if mode == "export+import":
        bundle = tmp / "vm.xfer"
        out = alab.cli(lab.fwsrc, "export", src.url, "--vm", VM, "--out", str(bundle))
        assert out.returncode == 0, out.stderr
        out = alab.cli(lab.fwdst, "import", dst.url, str(bundle), "--vm", VM, "--json")
    elif mode == "push":
        out = alab.cli(lab.fwsrc, "push", src.url, "--vm", VM, "--to", dst.url, "--json")
    elif mode == "pull":
        out = alab.cli(lab.fwdst, "pull", dst.url, "--vm", VM, "--from", src.url, "--json")
    else:
        out = None
    if out is not None:
        assert out.returncode == 0, out.stderr
    lab.move_vm()


@pytest.mark.parametrize("mode", ["export+import", "push", "pull", "none"])
def test_live_tcp_connection_survives_agent_transfer(alab: AgentLab, mode: str, tmp_path: Path) -> None:
    lab = alab.lab
    strict_destination(lab, loose=False)
    vm, srv = tcp_conversation(lab, SERVICE_IP)
    _move(alab, mode, tmp_path)
    survived = conversation_continues(vm, srv, "after-move")
    if mode == "none":
        assert not survived, "survived without transfer: the test does not discriminate"
        return
    assert survived, f"the connection died although the agents moved its state ({mode})"
    # The source never deletes on its own: its entry is still there until forgotten.
    assert _vm_entries(alab, lab.fwsrc), "the source lost its state without being asked to"
    out = alab.cli(lab.fwsrc, "forget", alab.src.url, "--vm", VM, "--json")
    assert out.returncode == 0, out.stderr
    assert not _vm_entries(alab, lab.fwsrc)


def test_status_and_metrics(alab: AgentLab) -> None:
    lab = alab.lab
    tcp_conversation(lab, SERVICE_IP)
    assert alab.cli(lab.fwsrc, "push", alab.src.url, "--vm", VM, "--to", alab.dst.url).returncode == 0
    out = alab.cli(lab.fwdst, "status", alab.dst.url, "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["device"] == "fw-dst" and status["kinds"] == ["conntrack"]
    assert status["counts"]["conntrack"] >= 1 and status["unfinished_imports"] == []
    # One JSON line per request, with the time of each phase.
    lines = [json.loads(x) for x in alab.dst.log_text().splitlines() if x.startswith("{")]
    imports = [x for x in lines if x.get("op") == "import"]
    assert imports and imports[-1]["status"] == 200 and imports[-1]["peer"] == "fw-src"
    assert {"receive", "decode", "import"} <= set(imports[-1]["phases_ms"])
    assert imports[-1]["entries"]["conntrack"] >= 1
    # The plain-HTTP Prometheus endpoint, scraped from the other firewall.
    scrape = lab.hosts.run(lab.fwsrc, ["python3", "-c", "import urllib.request; print(urllib.request."
                                       f"urlopen('http://{DST_AGENT_IP}:9464/metrics').read().decode())"])
    assert 'xfer_agent_requests_total{op="import",outcome="ok"} 1.0' in scrape.stdout, scrape.stderr
    assert 'xfer_agent_entries_total{kind="conntrack",op="import"}' in scrape.stdout


@pytest.mark.parametrize("client", ["no-certificate", "other-ca", "other-vm", "kind-not-held"])
def test_refused_requests_change_nothing(alab: AgentLab, client: str, tmp_path: Path) -> None:
    lab = alab.lab
    tcp_conversation(lab, SERVICE_IP)
    before_src = _vm_entries(alab, lab.fwsrc)
    bundle = tmp_path / "vm.xfer"
    assert alab.cli(lab.fwsrc, "export", alab.src.url, "--vm", VM, "--out", str(bundle)).returncode == 0
    if client == "no-certificate":
        out = alab.cli(lab.fwsrc, "push", alab.dst.url, "--vm", VM, "--to", alab.dst.url, name="")
        assert "no certificate" in out.stderr
        out2 = alab.cli(lab.fwdst, "import", alab.dst.url, str(bundle), "--vm", VM, name="")
        assert out2.returncode == 1
    elif client == "other-ca":
        from xfer import pki

        rogue = tmp_path / "rogue"
        pki.init_ca(rogue, "rogue CA")
        pki.issue(rogue, "operator")  # same name, wrong signer
        rogue_agents = LabAgents.__new__(LabAgents)
        rogue_agents.pki = rogue
        args = rogue_agents.client_args(alab.dst.url, ca=alab.agents.pki / "ca.pem")
        out = lab.hosts.run(lab.fwdst, [*XFER, "agent", "import", *args, str(bundle), "--vm", VM])
        assert "refused this client's certificate" in out.stderr
    elif client == "other-vm":
        out = alab.cli(lab.fwdst, "import", alab.dst.url, str(bundle), "--vm", "10.0.1.99")
        assert "not of the VM named in the request" in out.stderr
    else:
        out = alab.cli(lab.fwdst, "import", alab.dst.url, str(bundle), "--vm", VM, "--kinds", "counters")
        assert "does not hold counters" in out.stderr
    assert out.returncode == 1, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert _vm_entries(alab, lab.fwdst) == []
    assert _vm_entries(alab, lab.fwsrc) == before_src


def test_bundle_with_foreign_entries_is_refused(alab: AgentLab, tmp_path: Path) -> None:
    """A bundle that names the VM but carries another host's connection opens nothing."""
    from tests.ct_factory import bundle_of, tcp_entry
    from xfer import bundle as bundle_mod
    from xfer.model import parse_vm

    forged = bundle_of(parse_vm(VM, {}), [tcp_entry(VM_IP, SERVICE_IP, 40001),
                                          tcp_entry("10.0.1.66", SERVICE_IP, 40002)])
    path = tmp_path / "forged.xfer"
    bundle_mod.write(path, forged)
    out = alab.cli(alab.lab.fwdst, "import", alab.dst.url, str(path), "--vm", VM)
    assert out.returncode == 1 and "does not belong to VM" in out.stderr, out.stderr
    table = conntrack_list(alab.lab, alab.lab.fwdst)
    assert VM_IP not in table and "10.0.1.66" not in table, table


def test_hostile_bundles_through_the_agent_leave_nothing(alab: AgentLab, tmp_path: Path) -> None:
    """Issue 11 through the agent: a smuggled address inside a run of the VM's entries is
    refused, and an entry the kernel refuses mid-way rolls the rest back (not an internal
    error, as it was); in both cases the destination holds none of it and no import is left unfinished."""
    import struct

    from tests.ct_factory import bundle_of, tcp_entry
    from xfer import bundle as bundle_mod
    from xfer.conntrack import constants as c
    from xfer.conntrack import wire
    from xfer.conntrack.stream import RawEntry
    from xfer.model import parse_vm

    vm = parse_vm(VM, {})
    honest = [tcp_entry(VM_IP, SERVICE_IP, 20000 + i) for i in range(1209)]
    smuggler = wire.nest(c.CTA_TUPLE_IP, wire.nla(c.CTA_IP_V4_SRC, bytes([10, 0, 1, 66])),
                         wire.nla(c.CTA_IP_V4_DST, bytes([10, 0, 3, 2])))
    smuggled = list(honest)
    orig = wire.split(honest[600].blob)[c.CTA_TUPLE_ORIG]
    smuggled[600] = RawEntry(honest[600].family, wire.nest(c.CTA_TUPLE_ORIG, orig[4:], smuggler)
                             + honest[600].blob[len(orig):])
    refused = list(honest)
    blob = bytearray(honest[600].blob)
    blob[blob.rindex(struct.pack("=HH", 5, c.CTA_PROTOINFO_TCP_STATE)) + 4] = 200  # >= TCP_CONNTRACK_MAX
    refused[600] = RawEntry(honest[600].family, bytes(blob))
    for name, entries, reason in (("smuggled", smuggled, "entry 600 is malformed"),
                                  ("refused", refused, "rolled back 1208")):
        path = tmp_path / f"{name}.xfer"
        bundle_mod.write(path, bundle_of(vm, entries))
        out = alab.cli(alab.lab.fwdst, "import", alab.dst.url, str(path), "--vm", VM)
        assert out.returncode == 1 and reason in out.stderr, out.stderr
        assert "internal error" not in out.stderr, out.stderr
        # a refusal is one line; a rolled-back import prints the kind's report line first
        assert len(out.stderr.strip().splitlines()) == (1 if name == "smuggled" else 2), out.stderr
        assert "Traceback" not in alab.dst.log_text()
        table = conntrack_list(alab.lab, alab.lab.fwdst)
        assert VM_IP not in table and "10.0.1.66" not in table, table
    state = alab.agents.workdir / "state-fw-dst"
    assert not list(state.glob("import-*")), "an import was left unfinished in the journal"
