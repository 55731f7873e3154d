"""Shared steps of the conntrack lab tests: conversations, the move, witnesses."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from xfer.lab.topology import Lab
from xfer.lab.traffic import Peer

XFER = [sys.executable, "-m", "xfer.cli"]


def xfer(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a separate process, as an operator would."""
    return subprocess.run([*XFER, *args], capture_output=True, text=True, timeout=60, check=False)


def tcp_conversation(lab: Lab, host: str, port: int = 7000) -> tuple[Peer, Peer]:
    """A TCP connection VM → server that has exchanged a line each way."""
    srv = Peer(lab.hosts, lab.srv, "tcp-listen", str(port))
    assert srv.expect("ready"), "server peer did not start"
    vm = Peer(lab.hosts, lab.vm, "tcp-connect", host, str(port))
    assert vm.expect("connected"), "VM could not connect through the source firewall"
    assert srv.expect("connected")
    vm.send("hello")
    assert srv.expect("recv hello")
    srv.send("hi")
    assert vm.expect("recv hi")
    return vm, srv


def move(lab: Lab, transfer: bool, vm_spec: str, bundle: str | None = None) -> None:
    """Move the VM to the destination firewall, transferring its conntrack state or not.

    The transfer uses the CLI as separate processes (export on the source
    firewall, import on the destination), like an operator's script would.
    """
    bundle = bundle or f"/tmp/{lab.hosts.prefix}-{os.getpid()}.xfer"
    if transfer:
        out = xfer("export", "--vm", vm_spec, "--netns", lab.fwsrc, "--out", bundle)
        assert out.returncode == 0, out.stderr
    lab.move_vm()
    if transfer:
        out = xfer("import", bundle, "--netns", lab.fwdst, "--json")
        os.unlink(bundle)
        assert out.returncode == 0, out.stderr


def strict_destination(lab: Lab, loose: bool) -> None:
    """nf_conntrack_tcp_loose on the destination firewall; be_liberal always off."""
    lab.hosts.sysctl(lab.fwdst, "net/netfilter/nf_conntrack_tcp_loose", "1" if loose else "0")
    lab.hosts.sysctl(lab.fwdst, "net/netfilter/nf_conntrack_tcp_be_liberal", "0")


def invalid_count(lab: Lab, ns: str) -> int:
    """INVALID packets as conntrack(8) -S counts them, summed over CPUs."""
    out = lab.hosts.check(ns, ["conntrack", "-S"])
    return sum(int(n) for n in re.findall(r"\binvalid=(\d+)", out))


def nft_counter(lab: Lab, ns: str, name: str) -> int:
    out = lab.hosts.check(ns, ["nft", "list", "counter", "inet", "xfer", name])
    return int(re.search(r"packets (\d+)", out).group(1))  # type: ignore[union-attr]


def conntrack_list(lab: Lab, ns: str, *args: str) -> str:
    """The table as conntrack(8) prints it: the independent witness."""
    return lab.hosts.run(ns, ["conntrack", "-L", *args]).stdout

