"""A VM's filter rules move with it: a new connection the source firewall lets in for the
VM is dropped by the destination firewall until ``rules`` moved, and passes after.

Each backend on its own: nftables (the lab's ruleset) and iptables-legacy (the same
policy written with iptables-legacy, nftables flushed), driven by the real CLI; the
independent witnesses are ``nft -j list ruleset`` and ``iptables-legacy-save``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netns_tests.lab_helpers import xfer
from xfer import bundle as bundle_mod
from xfer.bundle import Section
from xfer.lab.hosts import have, stop_process
from xfer.lab.topology import VM_IP, VM_IP6, Lab
from xfer.lab.traffic import Peer
from xfer.model import Kind

VM = f"{VM_IP},{VM_IP6}"
PORT = 5301


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(f"r{os.getpid() % 10000}") as lab:
        lab.up()
        yield lab


def new_tcp_passes(lab: Lab, port: int = PORT) -> bool:
    """A new TCP connection from the server to the VM on ``port`` completes (2 s to try)."""
    listener = Peer(lab.hosts, lab.vm, "tcp-listen", str(port))
    try:
        assert listener.expect("ready"), "listener did not start in the VM"
        out = lab.hosts.run(lab.srv, ["nc", "-z", "-w", "2", VM_IP, str(port)])
        return out.returncode == 0
    finally:
        stop_process(listener.proc, grace=0.5)


def nft_ruleset(lab: Lab, ns: str) -> list[dict[str, object]]:
    """The ruleset as nft(8) lists it, handles and counters aside."""
    objs = json.loads(lab.hosts.check(ns, ["nft", "-j", "list", "ruleset"]))["nftables"]
    return [o for o in objs if "metainfo" not in o]


def legacy_save(lab: Lab, ns: str) -> str:
    """iptables-legacy-save and ip6tables-legacy-save of the filter table, without counters."""
    out = ""
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        text = lab.hosts.run(ns, [tool, "-t", "filter"]).stdout
        out += "\n".join(line.split(" [")[0] for line in text.splitlines() if not line.startswith("#"))
    return out


def move_rules(lab: Lab, path: str, *extra: str) -> dict[str, object]:
    out = xfer("export", "--vm", VM, "--kinds", "rules", "--netns", lab.fwsrc, "--out", path)
    assert out.returncode == 0, out.stderr
    out = xfer("import", path, "--netns", lab.fwdst, "--json", *extra)
    assert out.returncode == 0, out.stderr
    report: dict[str, object] = json.loads(out.stdout)
    return report


def forge(path: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the rules section of the bundle at ``path`` (checksums made to agree, as an
    attacker without the signing key can on an unsigned bundle)."""
    honest = bundle_mod.read(Path(path))
    section = honest.sections[Kind.RULES]
    parts = json.loads(section.payload)
    edit(parts)
    forged = Section(Kind.RULES, section.encoding, section.count, json.dumps(parts).encode(), section.meta)
    bundle_mod.write(Path(path), bundle_mod.Bundle(honest.vm, honest.source, {Kind.RULES: forged}))


def test_nft_rule_moves_and_opens_the_destination(lab: Lab, tmp_path: object) -> None:
    lab.allow_inbound(lab.fwsrc, f"ip daddr {VM_IP} tcp dport {PORT} ct state new accept")
    assert new_tcp_passes(lab), "the rule on fw1 does not let the connection in: the test proves nothing"
    out = xfer("rules", "ls", "--vm", VM, "--netns", lab.fwsrc, "--json")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert (found["rules"], found["chains"], found["left_out"]) == (1, 0, {})
    lab.move_vm()
    assert not new_tcp_passes(lab), "fw2 lets the connection in without the rule"
    path = f"/tmp/{lab.hosts.prefix}-rules.xfer"
    try:
        report = move_rules(lab, path)
        assert report["created"] == 1
        assert new_tcp_passes(lab), "fw2 still drops the connection after the rules moved"
        # where the source had it: in the inbound chain
        inbound = [o["rule"] for o in nft_ruleset(lab, lab.fwdst)
                   if "rule" in o and o["rule"]["chain"] == "inbound"]
        assert len(inbound) == 1 and inbound[0]["expr"][1]["match"]["right"] == PORT
        # importing again changes nothing
        before = nft_ruleset(lab, lab.fwdst)
        out = xfer("import", path, "--netns", lab.fwdst, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["created"] == 0 and json.loads(out.stdout)["skipped"] == 1
        assert nft_ruleset(lab, lab.fwdst) == before
        # forget at the source removes the VM's rule and nothing else
        src_before = nft_ruleset(lab, lab.fwsrc)
        out = xfer("forget", "--vm", VM, "--kinds", "rules", "--netns", lab.fwsrc)
        assert out.returncode == 0, out.stderr
        src_after = nft_ruleset(lab, lab.fwsrc)
        gone = [o for o in src_before if o not in src_after]
        assert len(gone) == 1 and gone[0]["rule"]["chain"] == "inbound"
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_a_forged_rule_for_another_host_is_refused_and_changes_nothing(lab: Lab) -> None:
    lab.allow_inbound(lab.fwsrc, f"ip daddr {VM_IP} tcp dport {PORT} ct state new accept")
    lab.move_vm()
    path = f"/tmp/{lab.hosts.prefix}-forged.xfer"
    out = xfer("export", "--vm", VM, "--kinds", "rules", "--netns", lab.fwsrc, "--out", path)
    assert out.returncode == 0, out.stderr
    try:
        original = Path(path).read_bytes()

        def another_host(parts: dict[str, Any]) -> None:
            parts["nft"]["rules"][0]["expr"][0]["match"]["right"] = "10.0.1.3"

        def catch_all(parts: dict[str, Any]) -> None:
            del parts["nft"]["rules"][0]["expr"][0]      # accept new TCP to anyone

        for edit, needle in [(another_host, "matches none of VM"), (catch_all, "matches none of VM")]:
            Path(path).write_bytes(original)
            forge(path, edit)
            before = nft_ruleset(lab, lab.fwdst)
            out = xfer("import", path, "--netns", lab.fwdst)
            assert out.returncode == 1
            assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
            assert nft_ruleset(lab, lab.fwdst) == before
            assert not new_tcp_passes(lab)
    finally:
        os.unlink(path)


LEGACY_POLICY = [
    ["-N", "inbound"],
    ["-P", "FORWARD", "DROP"],
    ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
    ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
    ["-A", "FORWARD", "-i", "vm0", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"],
    ["-A", "FORWARD", "-j", "inbound"],
]


def legacy_firewalls(lab: Lab) -> None:
    """The lab's policy written with iptables-legacy; nftables emptied on both firewalls."""
    for fw in (lab.fwsrc, lab.fwdst):
        lab.hosts.check(fw, ["nft", "flush", "ruleset"])
        for args in LEGACY_POLICY:
            lab.hosts.check(fw, ["iptables-legacy", *args])


@pytest.mark.skipif(not have("iptables-legacy"), reason="iptables-legacy is not installed")
def test_iptables_legacy_rule_moves_through_python_iptables(lab: Lab) -> None:
    legacy_firewalls(lab)
    lab.hosts.check(lab.fwsrc, ["iptables-legacy", "-A", "inbound", "-d", f"{VM_IP}/32", "-p", "tcp",
                                "--dport", str(PORT), "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"])
    assert new_tcp_passes(lab), "the legacy rule on fw1 does not let the connection in"
    lab.move_vm()
    assert not new_tcp_passes(lab), "fw2 lets the connection in without the rule"
    path = f"/tmp/{lab.hosts.prefix}-legacy.xfer"
    try:
        out = xfer("export", "--vm", VM, "--kinds", "rules", "--netns", lab.fwsrc, "--out", path)
        assert out.returncode == 0, out.stderr
        assert bundle_mod.read(Path(path)).sections[Kind.RULES].meta["backends"] == [
            "iptables", "nft"]
        out = xfer("import", path, "--netns", lab.fwdst, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["created"] == 1
        assert new_tcp_passes(lab), "fw2 still drops the connection after the rules moved"
        saved = legacy_save(lab, lab.fwdst)
        assert f"-A inbound -d {VM_IP}/32 -p tcp" in saved and f"--dport {PORT}" in saved
        out = xfer("import", path, "--netns", lab.fwdst, "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["created"] == 0
        assert legacy_save(lab, lab.fwdst) == saved
        # forged: the same rule for another host is refused and changes nothing
        forge(path, lambda parts: parts["iptables"]["rules"][0]["rule"].update(dst="10.0.1.3/32"))
        lab.hosts.check(lab.fwdst, ["iptables-legacy", "-F", "inbound"])
        saved = legacy_save(lab, lab.fwdst)
        out = xfer("import", path, "--netns", lab.fwdst)
        assert out.returncode == 1 and "matches none of VM" in out.stderr, out.stderr
        assert legacy_save(lab, lab.fwdst) == saved
        # forget at the source
        out = xfer("forget", "--vm", VM, "--kinds", "rules", "--netns", lab.fwsrc)
        assert out.returncode == 0, out.stderr
        assert f"{VM_IP}" not in legacy_save(lab, lab.fwsrc)
    finally:
        if os.path.exists(path):
            os.unlink(path)
