"""The import's in-place path creates exactly what the full rewrite creates.

Most entries are patched in place (``xfer.conntrack.layout``): everything the
kernel dumped is sent back but the message header, status, timeout and TCP flags.
This compares, with conntrack(8) as the witness, a table imported that way with
one built from ``wire.create_message`` for every entry, over entries of several
protocols, zones and marks, with and without accounting attributes.
"""

from __future__ import annotations

import re
from itertools import groupby

import pytest

from xfer.bundle import Bundle
from xfer.conntrack import constants as c
from xfer.conntrack import runs, stream, wire
from xfer.conntrack.model import TcpInfo
from xfer.conntrack.netlink import CtNetlink
from xfer.conntrack.transfer import Selectors, _section, _validated, export_stream, import_section
from xfer.lab.hosts import Hosts
from xfer.model import parse_vm

VM = "10.0.1.2,fd00:1::2"
_FLOWS = [
    ["-s", "10.0.1.2", "-d", "10.0.9.1", "-p", "tcp", "--sport", "40001", "--dport", "80",
     "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED", "-m", "42"],
    ["-s", "10.0.9.1", "-d", "10.0.1.2", "-p", "tcp", "--sport", "50001", "--dport", "22",
     "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED", "-w", "7"],
    ["-s", "10.0.1.2", "-d", "10.0.9.1", "-p", "udp", "--sport", "5353", "--dport", "53",
     "-u", "SEEN_REPLY"],
    ["-s", "10.0.1.2", "-d", "10.0.9.1", "-p", "icmp", "--icmp-type", "8", "--icmp-code", "0",
     "--icmp-id", "77"],
    ["-s", "fd00:1::2", "-d", "fd00:9::1", "-p", "tcp", "--sport", "40002", "--dport", "443",
     "--state", "TIME_WAIT", "-u", "SEEN_REPLY"],
    # a run of one layout, long enough to be checked and patched column by column
    *(["-s", "10.0.1.2", "-d", "10.0.9.2", "-p", "tcp", "--sport", str(port), "--dport", "8080",
       "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED"] for port in range(41000, 41040)),
]


def _table(hosts: Hosts, ns: str) -> list[str]:
    """conntrack -L, without what differs between two equal imports (timeout, id)."""
    out = hosts.run(ns, ["conntrack", "-L", "-o", "extended"]).stdout
    lines = [re.sub(r"^(\S+\s+\d+\s+\S+\s+\d+)\s+\d+", r"\1", line) for line in out.splitlines()]
    return sorted(re.sub(r"\s*id=\d+", "", line) for line in lines)


@pytest.mark.parametrize("accounting", [False, True], ids=["plain", "with-counters"])
def test_in_place_equals_full_rewrite(hosts: Hosts, accounting: bool) -> None:
    src, fast, slow = hosts.add("src"), hosts.add("fast"), hosts.add("slow")
    if accounting:  # dumps then carry CTA_COUNTERS_*, which the in-place path leaves alone
        hosts.check(src, ["sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1"])
    for flow in _FLOWS:
        hosts.check(src, ["conntrack", "-I", "-t", "300", *flow])
    vm = parse_vm(VM, {})
    dumped = export_stream(vm, src)
    assert len(dumped) == len(_FLOWS)
    section = _section(dumped, Selectors())
    plan = _validated(section, vm)
    in_place = sum(lay is not None for lay in plan.layouts)
    # the witness below only means something if both paths were taken as intended
    assert in_place == (0 if accounting else len(_FLOWS))
    if not accounting:
        longest = max(sum(1 for _ in g) for _, g in groupby(map(id, plan.layouts)))
        assert longest >= runs.RUN_AFTER

    report = import_section(section, Bundle(vm=vm, source={}, sections={section.kind: section}), fast)
    assert (report.created, report.failed) == (len(_FLOWS), 0)
    with CtNetlink(slow) as ct:
        failures = ct.batch((i + 1, wire.create_message(e.family, e.blob, i + 1))
                            for i, e in enumerate(stream.entries(dumped)))
    assert failures == {}

    got, want = _table(hosts, fast), _table(hosts, slow)
    assert len(got) == len(_FLOWS)
    assert got == want
    assert any("mark=42" in line for line in got) and any("zone=7" in line for line in got)
    # conntrack(8) does not print TCP flags and window scales: compare the dumps for those
    tcp_fast, tcp_slow = _tcp_state(fast), _tcp_state(slow)
    assert tcp_fast == tcp_slow
    assert all(t.flags_orig & c.TCP_FLAG_BE_LIBERAL for _, t in tcp_fast)


def _tcp_state(ns: str) -> list[tuple[str, TcpInfo]]:
    with CtNetlink(ns) as ct:
        parsed = [wire.parse_entry(e.family, e.blob) for e in stream.entries(ct.dump_all())]
    return sorted((f"{p.orig} {p.reply}", p.tcp) for p in parsed if p.tcp is not None)
