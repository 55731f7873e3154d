"""A VM's connections survive the move to another firewall because xfer moved
their conntrack entries — and die without the transfer.

Discriminating by construction: after the move the *server* speaks first (a
VM-first packet would be picked up mid-stream with tcp_loose=1 and pass with no
transfer), and every TCP case also runs with tcp_loose=0 on the destination.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest

from netns_tests.lab_helpers import (
    conntrack_list,
    invalid_count,
    move,
    nft_counter,
    strict_destination,
    tcp_conversation,
    xfer,
)
from xfer.lab.topology import SERVICE_IP, SERVICE_IP6, SNAT_IP, SNAT_SERVICE_IP, VM_IP, VM_IP6, Lab
from xfer.lab.traffic import Peer, conversation_continues

VM = f"{VM_IP},{VM_IP6}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(f"c{os.getpid() % 10000}") as lab:
        lab.up()
        yield lab


@pytest.mark.parametrize("loose", [True, False], ids=["tcp_loose=1", "tcp_loose=0"])
@pytest.mark.parametrize("transfer", [True, False], ids=["transfer", "no-transfer"])
def test_tcp_connection_survives_only_with_transfer(lab: Lab, loose: bool, transfer: bool) -> None:
    strict_destination(lab, loose)
    vm, srv = tcp_conversation(lab, SERVICE_IP)
    move(lab, transfer, VM)
    survived = conversation_continues(vm, srv, "after-move")
    assert survived == transfer, ("the connection died although its state was transferred"
                                  if transfer else
                                  "the connection survived without transfer: the test does not discriminate")


def test_bulk_stream_after_move_has_no_invalid_packets(lab: Lab) -> None:
    # NOTE: dumps carry TCP flags with a zero mask; copied verbatim the entry loses
    # window scaling and BE_LIBERAL and a bulk stream hits INVALID drops here.
    strict_destination(lab, loose=False)
    vm, srv = tcp_conversation(lab, SERVICE_IP)
    srv.command("bulk 1000000")  # grow the windows before the move
    assert vm.expect("bulk 1000000", timeout=10)
    move(lab, True, VM)
    before = invalid_count(lab, lab.fwdst)
    srv.command("bulk 50000000")
    done = vm.expect("bulk 50000000", timeout=60)
    assert done, "bulk transfer after the move did not complete"
    assert invalid_count(lab, lab.fwdst) - before == 0
    assert nft_counter(lab, lab.fwdst, "invalid_drops") == 0
    seconds = float(done.split()[2])
    print(f"50 MB after the move in {seconds:.3f} s ({50e6 * 8 / seconds / 1e9:.2f} Gbit/s)")


@pytest.mark.parametrize("transfer", [True, False], ids=["transfer", "no-transfer"])
def test_udp_flow_survives_only_with_transfer(lab: Lab, transfer: bool) -> None:
    srv = Peer(lab.hosts, lab.srv, "udp-listen", "5300", SERVICE_IP)
    assert srv.expect("ready")
    vm = Peer(lab.hosts, lab.vm, "udp-connect", SERVICE_IP, "5300")
    assert vm.expect("connected")
    vm.send("query")
    assert srv.expect("recv query")
    srv.send("answer")
    assert vm.expect("recv answer")
    move(lab, transfer, VM)
    srv.send("server-first")
    got = vm.expect("recv server-first", timeout=2)
    assert (got is not None) == transfer


@pytest.mark.parametrize("transfer", [True, False], ids=["transfer", "no-transfer"])
def test_icmp_echo_stream_from_server_survives_only_with_transfer(lab: Lab, transfer: bool) -> None:
    # The source firewall lets the server ping the VM; the destination has no such
    # rule, so echo requests after the move pass only as an established flow.
    lab.allow_inbound(lab.fwsrc, f"ip daddr {VM_IP} icmp type echo-request accept")
    ping = Peer.watch(lab.hosts, lab.srv, ["ping", "-n", "-i", "0.1", "-c", "40", VM_IP])
    assert ping.expect("64 bytes", timeout=3), "no echo reply before the move"
    move(lab, transfer, VM)
    moved_at = time.monotonic()
    seqs = []
    while time.monotonic() - moved_at < 6:
        line = ping.expect("64 bytes", timeout=6 - (time.monotonic() - moved_at))
        if line is None:
            break
        seqs.append(int(re.search(r"icmp_seq=(\d+)", line).group(1)))  # type: ignore[union-attr]
    if transfer:
        assert seqs and max(seqs) >= 38, f"echo replies stopped after the move: {seqs}"
    else:
        assert len(seqs) <= 1, f"echo replies went on without transfer: {seqs}"


def test_connection_opened_from_server_side_survives(lab: Lab) -> None:
    lab.allow_inbound(lab.fwsrc, f"ip daddr {VM_IP} tcp dport 8000 accept")
    strict_destination(lab, loose=False)
    vm = Peer(lab.hosts, lab.vm, "tcp-listen", "8000")
    assert vm.expect("ready")
    srv = Peer(lab.hosts, lab.srv, "tcp-connect", VM_IP, "8000")
    assert srv.expect("connected"), "server could not open the inbound connection"
    assert vm.expect("connected")
    srv.send("ping")
    assert vm.expect("recv ping")
    move(lab, True, VM)
    assert conversation_continues(vm, srv, "inbound")


def test_masqueraded_connection_survives(lab: Lab) -> None:
    strict_destination(lab, loose=False)
    srv = Peer(lab.hosts, lab.srv, "tcp-listen", "7100")
    assert srv.expect("ready")
    vm = Peer(lab.hosts, lab.vm, "tcp-connect", SNAT_SERVICE_IP, "7100")
    assert vm.expect("connected")
    peer = srv.expect("connected")
    assert peer and peer.endswith(SNAT_IP), f"not masqueraded: {peer}"
    move(lab, True, VM)
    table = conntrack_list(lab, lab.fwdst, "-p", "tcp", "--dport", "7100")
    assert f"dst={SNAT_IP}" in table, f"destination entry has no SNAT binding:\n{table}"
    assert conversation_continues(vm, srv, "via-snat")


def test_import_refuses_nat_entries_without_nat_hooks(lab: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = Peer(lab.hosts, lab.srv, "tcp-listen", "7100")
    assert srv.expect("ready")
    vm = Peer(lab.hosts, lab.vm, "tcp-connect", SNAT_SERVICE_IP, "7100")
    assert vm.expect("connected")
    lab.hosts.check(lab.fwdst, ["nft", "delete", "table", "ip", "xfer_nat"])
    lab.hosts.check(lab.fwdst, ["nft", "delete", "table", "ip6", "xfer_nat6"])
    bundle = str(tmp_path / "b.xfer")
    assert xfer("export", "--vm", VM, "--netns", lab.fwsrc, "--out", bundle).returncode == 0
    out = xfer("import", bundle, "--netns", lab.fwdst)
    assert out.returncode == 1
    assert "NAT hooks" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert VM_IP not in conntrack_list(lab, lab.fwdst)


def test_marks_and_labels_arrive_intact(lab: Lab) -> None:
    lab.hosts.check(lab.fwsrc, ["nft", "add", "rule", "inet", "xfer", "labels", "ip", "saddr",
                                VM_IP, "tcp", "dport", "7200", "ct", "mark", "set", "0x2a",
                                "ct", "label", "set", "5"])
    # Independent witness at the destination: nft counts packets whose entry carries label 5.
    lab.hosts.check(lab.fwdst, ["nft", "insert", "rule", "inet", "xfer", "forward", "ct", "label",
                                "5", "counter", "name", "new_drops", "accept"])
    lab.hosts.check(lab.fwdst, ["nft", "reset", "counter", "inet", "xfer", "new_drops"])
    vm, srv = tcp_conversation(lab, SERVICE_IP, 7200)
    move(lab, True, VM)
    table = conntrack_list(lab, lab.fwdst, "-m", "42")
    assert "dport=7200" in table, f"mark 42 did not arrive:\n{table}"
    assert conversation_continues(vm, srv, "labelled")
    assert nft_counter(lab, lab.fwdst, "new_drops") >= 1, "label 5 did not arrive"


def test_ipv6_tcp_connection_survives(lab: Lab) -> None:
    strict_destination(lab, loose=False)
    vm, srv = tcp_conversation(lab, SERVICE_IP6, 7300)
    move(lab, True, VM)
    assert conversation_continues(vm, srv, "v6")


def test_forget_removes_only_the_vms_entries(lab: Lab) -> None:
    tcp_conversation(lab, SERVICE_IP)
    lab.hosts.check(lab.fwsrc, ["conntrack", "-I", "-s", "10.7.7.7", "-d", "10.8.8.8", "-p", "udp",
                                "--sport", "1", "--dport", "2", "-t", "100"])
    out = xfer("forget", "--vm", VM, "--netns", lab.fwsrc, "--json")
    assert out.returncode == 0, out.stderr
    table = conntrack_list(lab, lab.fwsrc)
    assert VM_IP not in table
    assert "10.7.7.7" in table


def test_lab_down_leaves_nothing_behind() -> None:
    from xfer import netns

    lab = Lab(f"d{os.getpid() % 10000}")
    lab.up()
    names = [lab.vm, lab.fwsrc, lab.fwdst, lab.srv]
    Peer(lab.hosts, lab.srv, "tcp-listen", "7999").expect("ready")
    lab.down()
    assert not [n for n in names if netns.exists(n)]
    assert not [p for p in lab.hosts.procs if p.poll() is None]
