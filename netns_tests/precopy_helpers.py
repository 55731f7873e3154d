"""Shared steps of the pre-copy proofs: churn while the VM runs, compare the tables.

The comparison reads both firewalls with conntrack(8), the independent witness.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from netns_tests.lab_helpers import tcp_conversation
from xfer.lab.topology import SERVICE_IP, SNAT_SERVICE_IP, VM_IP, Lab
from xfer.lab.traffic import Peer

# conntrack -L: "tcp      6 431999 ESTABLISHED src=..."; udp/icmp have no state word.
_LINE = re.compile(r"^(?P<proto>\S+)\s+(?P<num>\d+)\s+(?P<timeout>\d+)\s+(?P<rest>.*)$")
_TCP_SYSCTL = {"SYN_SENT": "syn_sent", "SYN_RECV": "syn_recv", "ESTABLISHED": "established",
               "FIN_WAIT": "fin_wait", "CLOSE_WAIT": "close_wait", "LAST_ACK": "last_ack",
               "TIME_WAIT": "time_wait", "CLOSE": "close"}


@dataclass
class Flows:
    """The conversations of one churn scenario (closed ones are gone from the dict)."""

    tcp: dict[str, tuple[Peer, Peer]] = field(default_factory=dict)
    udp: dict[str, tuple[Peer, Peer]] = field(default_factory=dict)


def vm_entries(lab: Lab, ns: str) -> dict[str, int]:
    """The VM's entries as conntrack(8) lists them: line without timeout/use -> timeout."""
    # NOTE: conntrack(8) prints labels only with /etc/xtables/connlabel.conf, a host-wide
    # file we do not create: labels are compared with ``vm_labels`` instead.
    out = lab.hosts.check(ns, ["conntrack", "-L"])
    entries: dict[str, int] = {}
    for line in out.splitlines():
        if f"src={VM_IP} " not in line and f"dst={VM_IP} " not in line:
            continue
        m = _LINE.match(line.split(None, 2)[2] if line.startswith("ipv") else line)
        assert m, line
        rest = re.sub(r" use=\d+", "", m["rest"])
        entries[f"{m['proto']} {rest}"] = int(m["timeout"])
    return entries


def vm_labels(ns: str) -> dict[tuple[object, ...], bytes | None]:
    """Each of the VM's entries (original tuple) -> its labels, read with xfer's parser."""
    from xfer.conntrack.transfer import list_entries
    from xfer.model import parse_vm

    return {(e.orig.src, e.orig.dst, e.orig.sport, e.orig.dport): e.labels
            for e in list_entries(parse_vm(VM_IP), ns)}


def state_limit(lab: Lab, ns: str, key: str) -> int:
    """The kernel's timeout for the entry's state in namespace ``ns`` (sysctl)."""
    proto, rest = key.split(" ", 1)
    if proto == "tcp":
        state = rest.split()[0]
        name = f"nf_conntrack_tcp_timeout_{_TCP_SYSCTL[state]}"
    elif proto == "udp":
        name = "nf_conntrack_udp_timeout" if "[UNREPLIED]" in rest else "nf_conntrack_udp_timeout_stream"
    else:
        name = f"nf_conntrack_{proto}_timeout"
    return int(lab.hosts.read_sysctl(ns, f"net/netfilter/{name}"))


def check_same_entries(lab: Lab, source: dict[str, int], slack: int = 3) -> None:
    """The destination holds exactly the source's entries of the VM (tuples, state,
    status, mark, labels, NAT), each with a timeout between the source's remaining one
    and the destination kernel's limit for the state."""
    dest = vm_entries(lab, lab.fwdst)
    missing = sorted(set(source) - set(dest))
    stale = sorted(set(dest) - set(source))
    assert not missing and not stale, f"missing at destination: {missing}\nstale: {stale}"
    assert vm_labels(lab.fwdst) == vm_labels(lab.fwsrc)
    for key, remaining in source.items():
        limit = state_limit(lab, lab.fwdst, key)
        assert remaining - slack <= dest[key] <= limit, (key, remaining, dest[key], limit)


def open_tcp(lab: Lab, flows: Flows, name: str, port: int, host: str = SERVICE_IP) -> None:
    flows.tcp[name] = tcp_conversation(lab, host, port)


def open_udp(lab: Lab, flows: Flows, name: str, port: int) -> None:
    srv = Peer(lab.hosts, lab.srv, "udp-listen", str(port), SERVICE_IP)
    assert srv.expect("ready")
    vm = Peer(lab.hosts, lab.vm, "udp-connect", SERVICE_IP, str(port))
    assert vm.expect("connected")
    vm.send(f"{name}-hello")
    assert srv.expect(f"recv {name}-hello")
    srv.send(f"{name}-hi")
    assert vm.expect(f"recv {name}-hi")
    flows.udp[name] = (vm, srv)


def close_tcp(flows: Flows, name: str) -> None:
    """The VM closes: FIN both ways, the entry goes through the closing states."""
    vm, srv = flows.tcp.pop(name)
    vm.command("quit")
    assert srv.expect("closed"), f"{name}: the server did not see the close"


def refresh_udp(flows: Flows, name: str) -> None:
    vm, srv = flows.udp[name]
    vm.send(f"{name}-again")
    assert srv.expect(f"recv {name}-again")


def mark_rule(lab: Lab, port: int) -> None:
    """Flows of the VM to ``port`` get ct mark 0x2a and ct label 5 on the source firewall."""
    lab.hosts.check(lab.fwsrc, ["nft", "add", "rule", "inet", "xfer", "labels", "ip", "saddr",
                                VM_IP, "tcp", "dport", str(port), "ct", "mark", "set", "0x2a",
                                "ct", "label", "set", "5"])


NAT_HOST = SNAT_SERVICE_IP
