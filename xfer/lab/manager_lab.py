"""The manager's lab: a combined firewall+snooper and a router at the source, a separate
snooping switch and firewall at the destination, agents and the manager as processes.

::

    source path       vm:eth0 ── vm0 [fwsrc] up0 ── rf0 [rtsrc] rs0 ── src0 ┐
                      (firewall, DHCP snooping, counters)  (router, no state) │ [srv] 10.0.9.1
    destination path  vm:eth1 ── vm0 [swdst] up0 ── vm0 [fwdst] up0 ── dst0 ┘
                      (bridge, DHCP snooping)   (firewall, counters)

    management        ag0 in fwsrc (10.0.4.1), fwdst (.2), swdst (.3) ── bridge in [mg],
                      where the manager listens (10.0.4.9); the agents and the manager join
                      the multicast group 239.7.7.7:8702 there (the device-driven variant)

The VM has two interfaces with one MAC; ``move_vm`` takes eth0 down and brings
eth1 up with the VM's addresses (its sockets stay), and points the server at the
destination firewall. Both firewalls own the gateway address and run the lab
ruleset (firewall.nft). Used by netns_tests/test_manager*.py and ``xfer bench migrate``.

    with ManagerLab("m1", workdir) as lab:
        lab.up(); lab.start_agents(); lab.start_manager()
        lab.migrate("relay")
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from xfer import pki
from xfer.errors import XferError
from xfer.lab.agents import XFER, AgentProcess, LabAgents, device_toml, kind_available, unpin
from xfer.lab.etcd import EtcdProcess
from xfer.lab.hosts import Hosts, LabError
from xfer.lab.topology import GW_IP, GW_IP6, SERVICE_IP, SERVICE_IP6, VM_IP, VM_IP6, firewall_ruleset

VM_MAC = "02:00:00:00:01:02"
MANAGER_IP, MANAGER_PORT, UDP_PORT, MCAST_GROUP, MCAST_PORT = "10.0.4.9", 8700, 8701, "239.7.7.7", 8702
AGENT_IPS = {"fw-src": "10.0.4.1", "fw-dst": "10.0.4.2", "sw-dst": "10.0.4.3"}
SOURCE, DESTINATION = "hv-src", "hv-dst"
ETCD_PORT = 2379   # in [mg]'s own network namespace: no clash with anything outside


def topology_yaml(port: int = 7443, rules: bool = False) -> str:
    """The lab's topology: the router holds nothing; kinds are split differently on each side.
    With ``rules`` both firewalls hold the ``rules`` kind too."""
    fw = ", rules" if rules else ""

    def url(name: str) -> str:
        return f"https://{AGENT_IPS[name]}:{port}"

    return f"""
servers:
  {SOURCE}: {{gateway: core}}
  {DESTINATION}: {{gateway: core}}
gateways: [core]
devices:
  fw-src: {{type: firewall, kinds: [conntrack, dhcp, counters{fw}], agent: "{url('fw-src')}"}}
  rt-src: {{type: router, kinds: []}}
  sw-dst: {{type: switch, kinds: [dhcp], agent: "{url('sw-dst')}"}}
  fw-dst: {{type: firewall, kinds: [conntrack, counters{fw}], agent: "{url('fw-dst')}"}}
links:
  - [{SOURCE}, fw-src]
  - [fw-src, rt-src]
  - [rt-src, core]
  - [{DESTINATION}, sw-dst]
  - [sw-dst, fw-dst]
  - [fw-dst, core]
vms:
  vm1: {{mac: "{VM_MAC}", ipv4: ["{VM_IP}"], ipv6: ["{VM_IP6}"]}}
"""


def manager_toml(journal: Path, mode: str, address: str, port: int, cleanup: str = "delete",
                 store_ttl_s: float = 60, device_timeout_s: float = 10, udp: str = "",
                 multicast: str = "") -> str:
    """The lab manager's config: the topology in ``topology.yaml`` and the PKI in ``pki/`` beside it."""
    listen = f'address = "{address}"\nport = {port}\n'
    if udp:
        listen += f'udp = "{udp}"\n'
    if multicast:
        listen += f'multicast = "{multicast}"\nmulticast_interface = "{address}"\n'
    return f"""
[manager]
topology = "topology.yaml"
journal = "{journal}"
mode = "{mode}"
cleanup = "{cleanup}"
budget_ms = 300
store_ttl_s = {store_ttl_s}
device_timeout_s = {device_timeout_s}

[listen]
{listen}
[tls]
cert = "pki/manager.pem"
key = "pki/manager.key"
ca = "pki/ca.pem"
"""


class ManagerLab:
    """Build, run and tear down the manager lab (namespaces ``{prefix}-vm`` ...) in ``workdir``."""

    def __init__(self, prefix: str, workdir: Path, cleanup: str = "delete", store_ttl_s: float = 60,
                 device_timeout_s: float = 10, rules: bool = False, agent_extra: str = "") -> None:
        self.hosts = Hosts(prefix)
        self.rules = rules      # both firewalls hold the rules kind as well
        self.agent_extra = agent_extra   # more TOML for every agent (a [privsep] section)
        self.workdir = workdir
        self.cleanup = cleanup
        self.store_ttl_s, self.device_timeout_s = store_ttl_s, device_timeout_s
        self.ns = {short: self.hosts.name(short) for short in ("vm", "fwsrc", "rtsrc", "swdst", "fwdst",
                                                                "srv", "mg")}
        self.agents: dict[str, AgentProcess] = {}
        self.lab_agents: LabAgents | None = None
        self.manager: AgentProcess | None = None
        self.journal = workdir / "manager.db"
        self.etcd: EtcdProcess | None = None
        self.group: list[ManagerProcess] = []

    def __enter__(self) -> ManagerLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- building -----------------------------------------------------------------------------

    def up(self) -> ManagerLab:
        h, ns = self.hosts, self.ns
        try:
            for short in ns:
                h.add(short)
            h.addresses(ns["srv"], "lo", [f"{SERVICE_IP}/32", f"{SERVICE_IP6}/128"])
            for fw in (ns["fwsrc"], ns["rtsrc"], ns["fwdst"]):
                h.sysctl(fw, "net/ipv4/ip_forward", "1")
                h.sysctl(fw, "net/ipv6/conf/all/forwarding", "1")
            # Source path.
            h.veth(ns["vm"], "eth0", ns["fwsrc"], "vm0", [f"{VM_IP}/24", f"{VM_IP6}/64"],
                   [f"{GW_IP}/24", f"{GW_IP6}/64"])
            h.veth(ns["fwsrc"], "up0", ns["rtsrc"], "rf0", ["10.0.2.1/24", "fd00:2::1/64"],
                   ["10.0.2.2/24", "fd00:2::2/64"])
            h.veth(ns["rtsrc"], "rs0", ns["srv"], "src0", ["10.0.5.1/24", "fd00:5::1/64"],
                   ["10.0.5.2/24", "fd00:5::2/64"])
            h.route(ns["fwsrc"], f"{SERVICE_IP}/32", "10.0.2.2")
            h.route(ns["fwsrc"], f"{SERVICE_IP6}/128", "fd00:2::2")
            h.route(ns["rtsrc"], f"{SERVICE_IP}/32", "10.0.5.2")
            h.route(ns["rtsrc"], f"{SERVICE_IP6}/128", "fd00:5::2")
            h.route(ns["rtsrc"], "10.0.1.0/24", "10.0.2.1")
            h.route(ns["rtsrc"], "fd00:1::/64", "fd00:2::1")
            # Destination path: the switch bridges the VM's second interface to the firewall.
            h.veth(ns["vm"], "eth1", ns["swdst"], "vm0")
            h.veth(ns["swdst"], "up0", ns["fwdst"], "vm0", (), [f"{GW_IP}/24", f"{GW_IP6}/64"])
            h.check(ns["swdst"], ["ip", "link", "add", "br0", "type", "bridge"])
            for port in ("vm0", "up0"):
                h.check(ns["swdst"], ["ip", "link", "set", port, "master", "br0"])
            h.link_up(ns["swdst"], "br0")
            h.veth(ns["fwdst"], "up0", ns["srv"], "dst0", ["10.0.3.1/24", "fd00:3::1/64"],
                   ["10.0.3.2/24", "fd00:3::2/64"])
            h.route(ns["fwdst"], f"{SERVICE_IP}/32", "10.0.3.2")
            h.route(ns["fwdst"], f"{SERVICE_IP6}/128", "fd00:3::2")
            for fw in (ns["fwsrc"], ns["fwdst"]):
                h.nft(fw, firewall_ruleset())
            # The VM: one MAC on both interfaces; eth1 waits, down, for the move.
            for ifname in ("eth0", "eth1"):
                h.check(ns["vm"], ["ip", "link", "set", ifname, "address", VM_MAC])
            h.check(ns["vm"], ["ip", "link", "set", "eth1", "down"])
            h.route(ns["vm"], "default", GW_IP)
            h.route(ns["vm"], "default", GW_IP6)
            self._point_server("10.0.5.1", "fd00:5::1")
            self._management()
        except BaseException:
            self.down()
            raise
        return self

    def _management(self) -> None:
        h, mg = self.hosts, self.ns["mg"]
        h.check(mg, ["ip", "link", "add", "br0", "type", "bridge"])
        h.addresses(mg, "br0", [f"{MANAGER_IP}/24"])
        h.link_up(mg, "br0")
        for short, name in (("fwsrc", "fw-src"), ("fwdst", "fw-dst"), ("swdst", "sw-dst")):
            h.veth(self.ns[short], "ag0", mg, f"m-{short}", f"{AGENT_IPS[name]}/24")
            h.check(mg, ["ip", "link", "set", f"m-{short}", "master", "br0"])
        # Multicast for the device-driven messages stays on the lab bridge.
        h.route(mg, f"{MCAST_GROUP}/32", dev="br0")

    def _point_server(self, via4: str, via6: str) -> None:
        h, srv = self.hosts, self.ns["srv"]
        h.route(srv, "10.0.1.0/24", via4, replace=True, src=SERVICE_IP)
        h.route(srv, "fd00:1::/64", via6, replace=True, src=SERVICE_IP6)

    def move_vm(self) -> None:
        """The VM now runs behind the destination switch (same MAC, addresses and sockets)."""
        h, vm = self.hosts, self.ns["vm"]
        h.check(vm, ["ip", "link", "set", "eth0", "down"])
        h.addresses(vm, "eth1", [f"{VM_IP}/24", f"{VM_IP6}/64"])
        h.link_up(vm, "eth1")
        h.route(vm, "default", GW_IP, dev="eth1", replace=True)
        h.route(vm, "default", GW_IP6, dev="eth1", replace=True)
        self._point_server("10.0.3.1", "fd00:3::1")

    # --- processes ----------------------------------------------------------------------------

    def start_agents(self, device_driven: bool = True) -> dict[str, AgentProcess]:
        """Agents on the three devices that hold state (the router has none), in the multicast
        group unless ``device_driven`` is False; a static binding for the VM at the source's
        snooper."""
        self.lab_agents = agents = LabAgents(self.hosts, self.workdir)
        fw = ["rules"] if self.rules else []
        all_kinds = ["conntrack", "dhcp", "counters", *fw]
        devices = (("fw-src", "fwsrc", all_kinds, device_toml(["vm0"], "up0", ["vm0"])),
                   ("fw-dst", "fwdst", ["conntrack", "counters", *fw], device_toml(["vm0"])),
                   ("sw-dst", "swdst", ["dhcp"], device_toml((), "up0", ["vm0"])))
        for name, short, kinds, extra in devices:
            if device_driven:
                extra += (f'\n[manager]\nurl = "https://{MANAGER_IP}:{MANAGER_PORT}"\n'
                          f'group = "{MCAST_GROUP}:{MCAST_PORT}"\ninterface = "{AGENT_IPS[name]}"\n')
            self.agents[name] = agents.start(name, self.ns[short], AGENT_IPS[name], kinds,
                                             extra=extra + self.agent_extra)
        from xfer.dhcp.device import add_static
        from xfer.dhcp.model import Binding

        add_static(self.ns["fwsrc"], Binding(VM_MAC, VM_IP, None, "vm0", source="static"))
        return self.agents

    def start_manager(self, mode: str = "relay") -> AgentProcess:
        """Write the topology and the manager's config, issue its certificate, start it in [mg]."""
        assert self.lab_agents is not None, "start_agents() first"
        pki.issue(self.lab_agents.pki, "manager", ips=[MANAGER_IP])
        (self.workdir / "topology.yaml").write_text(topology_yaml(rules=self.rules))
        config = self.workdir / "manager.toml"
        config.write_text(manager_toml(self.journal, mode, MANAGER_IP, MANAGER_PORT, self.cleanup,
                                       self.store_ttl_s, self.device_timeout_s,
                                       udp=f"{MANAGER_IP}:{UDP_PORT}",
                                       multicast=f"{MCAST_GROUP}:{MCAST_PORT}"))
        self.manager = ManagerProcess(self.hosts, "manager", self.ns["mg"], config,
                                      self.workdir / "manager.log", self.url)
        return self.manager.start()

    def start_etcd(self) -> EtcdProcess:
        """A one-member etcd in [mg] on the manager's address (its own data dir, stopped at down())."""
        self.etcd = EtcdProcess(self.workdir / "etcd", MANAGER_IP, ("ip", "netns", "exec", self.ns["mg"]),
                                ETCD_PORT, ETCD_PORT + 1)
        return self.etcd.start()

    def start_manager_group(self, count: int = 3, mode: str = "relay") -> list[ManagerProcess]:
        """``count`` managers in [mg] sharing the etcd journal (``start_etcd`` first), on ports
        MANAGER_PORT, +10, +20; one becomes the leader."""
        assert self.lab_agents is not None and self.etcd is not None, "start_agents() and start_etcd() first"
        pki.issue(self.lab_agents.pki, "manager", ips=[MANAGER_IP])
        (self.workdir / "topology.yaml").write_text(topology_yaml())
        self.group = []
        for i in range(count):
            port = MANAGER_PORT + 10 * i
            config = self.workdir / f"manager-{i}.toml"
            url = f"https://{MANAGER_IP}:{port}/v1/migrations"
            config.write_text(f"""
[manager]
topology = "topology.yaml"
mode = "{mode}"
cleanup = "{self.cleanup}"
store_ttl_s = {self.store_ttl_s}

[listen]
address = "{MANAGER_IP}"
port = {port}

[tls]
cert = "pki/manager.pem"
key = "pki/manager.key"
ca = "pki/ca.pem"

[journal]
backend = "etcd"
endpoints = ["{self.etcd.url}"]
prefix = "/xfer-lab/"
lease_s = 2
url = "{url}"
""")
            proc = ManagerProcess(self.hosts, f"manager-{i}", self.ns["mg"], config,
                                  self.workdir / f"manager-{i}.log", url)
            proc.start()
            self.group.append(proc)
        return self.group

    def leader(self, timeout: float = 15.0) -> ManagerProcess:
        """The group member that is leading now (its log's last role event says so)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leading = [m for m in self.group if m.proc is not None and m.proc.poll() is None
                       and _last_role(m.log_text()) == "leading"]
            if len(leading) == 1:
                return leading[0]
            time.sleep(0.05)
        raise LabError("no single leader among the managers")

    def group_urls(self) -> str:
        return ",".join(m.url for m in self.group)

    @property
    def url(self) -> str:
        return f"https://{MANAGER_IP}:{MANAGER_PORT}/v1/migrations"

    def client_args(self) -> list[str]:
        assert self.lab_agents is not None
        p = self.lab_agents.pki
        return ["--manager", self.url, "--ca", str(p / "ca.pem"), "--cert", str(p / "operator.pem"),
                "--key", str(p / "operator.key")]

    def xfer(self, *args: str, ns: str = "mg", timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the CLI as an operator would, inside a lab namespace (default: the manager's)."""
        return self.hosts.run(self.ns[ns], [*XFER, *args], timeout=timeout)

    def migrate(self, mode: str, *extra: str) -> dict[str, Any]:
        out = self.xfer("migrate", "vm1", "--from", SOURCE, "--to", DESTINATION, "--mode", mode,
                        *self.client_args(), "--json", *extra)
        if out.returncode != 0:
            raise LabError(f"xfer migrate failed: {out.stderr.strip()}")
        report: dict[str, Any] = json.loads(out.stdout)
        return report

    def notify(self, direction: str, *extra: str, sender: str = "fwsrc", target: str = "multicast",
               mode: str = "store", destination: str = DESTINATION) -> subprocess.CompletedProcess[str]:
        """``xfer notify`` as a datagram from a device's management address (default: the source
        firewall) to the multicast group (or ``target`` "udp": the manager), store mode."""
        addr = f"{MCAST_GROUP}:{MCAST_PORT}" if target == "multicast" else f"{MANAGER_IP}:{UDP_PORT}"
        name = {"fwsrc": "fw-src", "fwdst": "fw-dst", "swdst": "sw-dst"}[sender]
        indication = "not-running" if direction == "out" else "starting"
        return self.xfer("notify", "--vm", "vm1", "--indication", indication, "--direction", direction,
                         "--from", SOURCE, "--to", destination, "--mode", mode, "--udp", addr,
                         "--interface", AGENT_IPS[name], "--json", *extra, ns=sender)

    def migrations(self) -> list[dict[str, Any]]:
        where = (["--config", str(self.workdir / "manager-0.toml")] if self.group
                 else ["--journal", str(self.journal)])
        out = self.xfer("migrations", *where, "--json")
        if out.returncode != 0:
            raise LabError(f"xfer migrations failed: {out.stderr.strip()}")
        result: list[dict[str, Any]] = json.loads(out.stdout)
        return result

    def wait_outcome(self, migration: int, timeout: float = 15) -> dict[str, Any]:
        """The journal's record of a migration once it has an outcome (cleanup runs after the answer)."""
        deadline = time.monotonic() + timeout
        while True:
            rec = next(m for m in self.migrations() if m["id"] == migration)
            if rec["outcome"] or time.monotonic() > deadline:
                return rec
            time.sleep(0.1)

    def down(self) -> None:
        """Stop processes, remove namespaces and BPF pins, also those of an earlier crashed run."""
        if self.etcd is not None:
            self.etcd.stop()
        for short in self.ns.values():
            self.hosts.adopt(short)
        self.hosts.close()
        if kind_available("xfer.counters.device"):
            from xfer.counters import device as counters_device

            for fw in ("fwsrc", "fwdst"):
                # Pins and the import lock file outlive the namespace otherwise.
                with contextlib.suppress(XferError, OSError):
                    counters_device.detach("vm0", self.ns[fw], unpin=True)
        unpin([self.ns["fwsrc"], self.ns["fwdst"], self.ns["swdst"]])


class ManagerProcess(AgentProcess):
    """``xfer manager serve`` in a namespace: started, stopped and killed like an agent."""

    command = ("manager", "serve")


def _last_role(log: str) -> str | None:
    """"leading" or "following": the last such event in a manager's log."""
    lead, follow = log.rfind('"event":"leading"'), log.rfind('"event":"following"')
    if lead < 0 and follow < 0:
        return None
    return "leading" if lead > follow else "following"
