"""Namespaces, veth links, addresses and processes for labs and kernel tests.

``Hosts`` owns everything it creates and removes it in ``close()`` (also as a
context manager), so a failing test leaves nothing behind. Needs root
(CAP_SYS_ADMIN for namespaces, CAP_NET_ADMIN for links).

    with Hosts("t1") as h:
        a, b = h.add("a"), h.add("b")
        h.veth(a, "eth0", b, "eth0", "10.9.0.1/24", "10.9.0.2/24")
        h.run(a, ["ping", "-c1", "10.9.0.2"])
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from xfer import netns as xnetns
from xfer.errors import XferError


class LabError(XferError):
    """A lab or test host could not be built."""


def _pyroute2() -> Any:
    # pyroute2 takes ~0.1 s to import: only the lab pays for it.
    import pyroute2

    return pyroute2


class Hosts:
    """A set of namespaces named ``{prefix}-{name}`` with their links and processes."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    # --- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def name(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def add(self, short: str) -> str:
        """Create namespace ``{prefix}-{short}`` (replacing a stale one) with lo up."""
        pr = _pyroute2()
        name = self.name(short)
        if name in pr.netns.listnetns():
            remove_namespace(name)
        pr.netns.create(name)
        self.namespaces.append(name)
        # Addresses must be usable at once: no IPv6 duplicate address detection.
        for key in ("net/ipv6/conf/all/accept_dad", "net/ipv6/conf/default/accept_dad"):
            self.sysctl(name, key, "0")
        with pr.IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    def adopt(self, name: str) -> None:
        """Take ownership of an existing namespace (to remove it in close())."""
        if name not in self.namespaces:
            self.namespaces.append(name)

    def close(self) -> None:
        """Stop every process started here and remove every namespace. Never raises."""
        for proc in self.procs:
            stop_process(proc)
        self.procs.clear()
        for name in reversed(self.namespaces):
            remove_namespace(name)
        self.namespaces.clear()

    # --- links and addresses -----------------------------------------------------------

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str,
             addrs_a: str | Sequence[str] = (), addrs_b: str | Sequence[str] = ()) -> None:
        """Connect two namespaces with a veth pair, bring both ends up, add addresses."""
        pr = _pyroute2()
        tmp = f"x{os.getpid() % 100000}{len(self.namespaces)}"[:15]
        with pr.IPRoute() as ipr:
            ipr.link("add", ifname=tmp, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b})
            ipr.link("set", index=ipr.link_lookup(ifname=tmp)[0], net_ns_fd=ns_a)
        with pr.IPRoute(netns=ns_a) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=tmp)[0], ifname=if_a)
        for ns, ifname, addrs in ((ns_a, if_a, addrs_a), (ns_b, if_b, addrs_b)):
            self.addresses(ns, ifname, [addrs] if isinstance(addrs, str) else list(addrs))
            self.link_up(ns, ifname)

    def addresses(self, ns: str, ifname: str, cidrs: Sequence[str]) -> None:
        pr = _pyroute2()
        with pr.IPRoute(netns=ns) as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            for cidr in cidrs:
                iface = ipaddress.ip_interface(cidr)
                ipr.addr("add", index=index, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen)

    def link_up(self, ns: str, ifname: str) -> None:
        pr = _pyroute2()
        with pr.IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")

    def move_link(self, ns_from: str, ifname: str, ns_to: str) -> None:
        """Move an interface to another namespace (its addresses are dropped by the kernel)."""
        pr = _pyroute2()
        with pr.IPRoute(netns=ns_from) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], net_ns_fd=ns_to)

    def route(self, ns: str, dst: str, gateway: str | None = None, dev: str | None = None,
              replace: bool = False, src: str | None = None) -> None:
        argv = ["ip", "route", "replace" if replace else "add", dst]
        if gateway:
            argv += ["via", gateway]
        if dev:
            argv += ["dev", dev]
        if src:
            argv += ["src", src]
        self.check(ns, argv)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        with xnetns.entered(ns), open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
            f.write(value)

    def read_sysctl(self, ns: str, key: str) -> str:
        with xnetns.entered(ns), open(f"/proc/sys/{key.replace('.', '/')}") as f:
            return f.read().strip()

    def nft(self, ns: str, ruleset: str) -> None:
        """Load an nftables ruleset (text) into a namespace."""
        self.check(ns, ["nft", "-f", "-"], input=ruleset)

    # --- processes --------------------------------------------------------------------

    def run(self, ns: str, argv: Sequence[str], input: str | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside a namespace and wait for it."""
        return subprocess.run(["ip", "netns", "exec", ns, *argv], input=input, text=True,
                              capture_output=True, timeout=timeout, check=False)

    def check(self, ns: str, argv: Sequence[str], input: str | None = None,
              timeout: float = 30) -> str:
        proc = self.run(ns, argv, input=input, timeout=timeout)
        if proc.returncode != 0:
            raise LabError(f"{' '.join(argv)} in {ns} failed: {proc.stderr.strip()}")
        return proc.stdout

    def spawn(self, ns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a long-running process in a namespace; close() stops it."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv],  # type: ignore[call-overload]
                                start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc


def stop_process(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    """Terminate a process group started by ``spawn``; kill it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (ProcessLookupError, PermissionError):
        return
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def remove_namespace(name: str) -> None:
    """Kill what still runs inside a namespace, then delete it. Never raises."""
    if not xnetns.exists(name):
        return
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                          check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
