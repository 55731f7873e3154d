"""The lab: a VM behind a source firewall, a destination firewall, and a server.

::

     vm (10.0.1.2)                    srv (service 10.0.9.1, 10.0.9.2)
       eth0 ── vm0 [fwsrc] up0 ── src0 ┤
                                       │
          (after the move)             │
       eth0 ── vm0 [fwdst] up0 ── dst0 ┘

Both firewalls own the VM subnet's gateway address (10.0.1.1, fd00:1::1) and the
lab SNAT address 10.0.8.1, and run the same stateful ruleset (firewall.nft).
Moving the VM moves the firewall end of its veth (vm0) from fwsrc to fwdst and
points the server's routes at fwdst: the VM keeps its addresses, MAC and sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from xfer.lab.hosts import Hosts

VM_IP, VM_IP6 = "10.0.1.2", "fd00:1::2"
GW_IP, GW_IP6 = "10.0.1.1", "fd00:1::1"
SERVICE_IP, SERVICE_IP6 = "10.0.9.1", "fd00:9::1"
SNAT_SERVICE_IP = "10.0.9.2"   # traffic to it is masqueraded to SNAT_IP by the firewalls
SNAT_IP = "10.0.8.1"


@dataclass(frozen=True)
class Side:
    """One firewall and its link to the server."""

    short: str
    up_ip: str
    up_ip6: str
    srv_ip: str
    srv_ip6: str


SOURCE = Side("fwsrc", "10.0.2.1", "fd00:2::1", "10.0.2.2", "fd00:2::2")
DESTINATION = Side("fwdst", "10.0.3.1", "fd00:3::1", "10.0.3.2", "fd00:3::2")


def firewall_ruleset() -> str:
    return resources.files("xfer.lab").joinpath("firewall.nft").read_text()


class Lab:
    """Build, move and tear down the lab. Namespaces are ``{prefix}-vm`` and so on.

    >>> with Lab("xfer") as lab:          # doctest: +SKIP
    ...     lab.up(); lab.move_vm()
    """

    def __init__(self, prefix: str = "xfer") -> None:
        self.hosts = Hosts(prefix)
        self.vm = self.hosts.name("vm")
        self.fwsrc = self.hosts.name(SOURCE.short)
        self.fwdst = self.hosts.name(DESTINATION.short)
        self.srv = self.hosts.name("srv")
        self.vm_side = self.fwsrc

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Lab:
        h = self.hosts
        try:
            for short in ("vm", SOURCE.short, DESTINATION.short, "srv"):
                h.add(short)
            self._server()
            for side in (SOURCE, DESTINATION):
                self._firewall(side)
            h.veth(self.vm, "eth0", self.fwsrc, "vm0", [f"{VM_IP}/24", f"{VM_IP6}/64"])
            self._gateway(self.fwsrc)
            h.route(self.vm, "default", GW_IP)
            h.route(self.vm, "default", GW_IP6)
            self._point_server_at(SOURCE)
        except BaseException:
            self.down()
            raise
        return self

    def _server(self) -> None:
        h = self.hosts
        h.addresses(self.srv, "lo", [f"{SERVICE_IP}/32", f"{SNAT_SERVICE_IP}/32",
                                     f"{SERVICE_IP6}/128"])

    def _firewall(self, side: Side) -> None:
        h = self.hosts
        fw = h.name(side.short)
        iface = "src0" if side is SOURCE else "dst0"
        h.veth(fw, "up0", self.srv, iface, [f"{side.up_ip}/24", f"{side.up_ip6}/64"],
               [f"{side.srv_ip}/24", f"{side.srv_ip6}/64"])
        h.sysctl(fw, "net/ipv4/ip_forward", "1")
        h.sysctl(fw, "net/ipv6/conf/all/forwarding", "1")
        h.addresses(fw, "lo", [f"{SNAT_IP}/32"])
        h.route(fw, f"{SERVICE_IP}/32", side.srv_ip)
        h.route(fw, f"{SNAT_SERVICE_IP}/32", side.srv_ip)
        h.route(fw, f"{SERVICE_IP6}/128", side.srv_ip6)
        h.nft(fw, firewall_ruleset())

    def _gateway(self, fw: str) -> None:
        self.hosts.addresses(fw, "vm0", [f"{GW_IP}/24", f"{GW_IP6}/64"])
        self.hosts.link_up(fw, "vm0")

    def _point_server_at(self, side: Side) -> None:
        # The server always speaks from its service address, whichever firewall
        # leads to the VM, so its connections keep their tuples across the move.
        h = self.hosts
        h.route(self.srv, "10.0.1.0/24", side.up_ip, replace=True, src=SERVICE_IP)
        h.route(self.srv, f"{SNAT_IP}/32", side.up_ip, replace=True, src=SERVICE_IP)
        h.route(self.srv, "fd00:1::/64", side.up_ip6, replace=True, src=SERVICE_IP6)

    def move_vm(self) -> None:
        """Re-home the VM behind the destination firewall (link and server routes)."""
        h = self.hosts
        h.move_link(self.fwsrc, "vm0", self.fwdst)
        self._gateway(self.fwdst)
        self._point_server_at(DESTINATION)
        self.vm_side = self.fwdst

    def allow_inbound(self, fw: str, rule: str) -> None:
        """Add an inbound exception (nft rule body) to one firewall's ``inbound`` chain."""
        self.hosts.check(fw, ["nft", "add", "rule", "inet", "xfer", "inbound", *rule.split()])

    def down(self) -> None:
        """Remove every namespace of this lab, also ones left by an earlier crashed run."""
        for short in ("vm", SOURCE.short, DESTINATION.short, "srv"):
            self.hosts.adopt(self.hosts.name(short))
        self.hosts.close()

    def describe(self) -> str:
        return (f"lab up: VM {self.vm} ({VM_IP}, {VM_IP6}) behind {self.vm_side}; "
                f"destination firewall {self.fwdst}; server {self.srv} "
                f"({SERVICE_IP}, {SERVICE_IP6})")
