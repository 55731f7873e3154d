"""The end-to-end lab: real Linux guests under QEMU in two hypervisor namespaces.

::

    hv1 (sw1)  br0: tap-vm1, tap-vm2 (QEMU, untrusted 'tap*') + up0 ── vm0 [fw1] up0 ── src0 ┐
      │ mig0 (10.0.6.1)                                                                      │ [srv]
      │ migration stream                                                                     │ 10.0.9.1
    hv2 (sw2)  br0: tap-* (destination QEMUs, -incoming)    + up0 ── vm0 [fw2] up0 ── dst0 ┘
    management  ag0 in fw1 (10.0.4.1), fw2 (.2), hv1 (.3), hv2 (.4) ── bridge in [mg] (manager .9)

Each hypervisor's bridge is its access switch: the agent there (sw1, sw2) snoops
DHCP with IP source guard on every ``tap*`` port as it appears, the uplink up0
trusted. Both firewalls own the guests' gateway (10.0.1.1, one MAC: an anycast
gateway), relay DHCP to the server's dnsmasq, run the lab's stateful ruleset with
``tcp_loose=0`` and ``be_liberal=0``, and count per VM on vm0. The server runs
dnsmasq and the talker (``xfer.lab.talker``): a TCP server that speaks first.
Guests are ``xfer.lab.guest`` (Debian kernel + busybox), one QEMU each, booted
in hv1; a migration starts the destination QEMU in hv2 with ``-incoming`` (its
tap appears then) and streams over mig0. After the switchover the server's route
to that guest moves to fw2 (the network converging on the new path).

    with GuestLab("xg", workdir) as lab:
        lab.up(); lab.start_agents(); lab.start_manager()
        vm = lab.boot("vm1"); lab.wait_console(vm, "connected")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfer import pki
from xfer.errors import XferError
from xfer.lab import guest as guest_build
from xfer.lab.agents import XFER, AgentProcess, LabAgents, device_toml, unpin
from xfer.lab.hosts import Hosts, LabError
from xfer.lab.manager_lab import ManagerProcess, manager_toml
from xfer.lab.qemu import QemuGuest, start_guest
from xfer.lab.switch import start_dnsmasq
from xfer.lab.talker import Line, read_log
from xfer.lab.topology import firewall_ruleset

SERVICE_IP, PORT = "10.0.9.1", 7000
GW_IP, GW_MAC = "10.0.1.1", "02:00:00:00:0f:01"
DHCP_FIRST, DHCP_LAST = "10.0.1.100", "10.0.1.150"
MIG_SRC, MIG_DST = "10.0.6.1", "10.0.6.2"
MANAGER_IP, MANAGER_PORT = "10.0.4.9", 8700
AGENT_IPS = {"fw1": "10.0.4.1", "fw2": "10.0.4.2", "sw1": "10.0.4.3", "sw2": "10.0.4.4"}
UPLINK = {"fw1": ("10.0.2.1", "10.0.2.2", "src0"), "fw2": ("10.0.3.1", "10.0.3.2", "dst0")}
MACS = {"vm1": "52:54:00:00:01:01", "vm2": "52:54:00:00:01:02"}
# dnsmasq reserves these (the operator's inventory knows a VM's address); the guests
# still take them by DHCP, through the snooping switch.
IPS = {"vm1": "10.0.1.101", "vm2": "10.0.1.102"}
MEMORY_MB = 128
SOURCE, DESTINATION = "hv1", "hv2"
SWITCH_HOST = {"sw1": "hv1", "sw2": "hv2"}   # each hypervisor's bridge is its access switch


def topology_yaml(port: int = 7443) -> str:
    """Two servers, each behind its own access switch (dhcp) and firewall (conntrack, counters).

    Written as JSON, which is YAML too.
    """
    def device(kind: str, kinds: list[str], name: str) -> dict[str, Any]:
        return {"type": kind, "kinds": kinds, "agent": f"https://{AGENT_IPS[name]}:{port}"}

    path = {SOURCE: ("sw1", "fw1"), DESTINATION: ("sw2", "fw2")}
    return json.dumps({
        "servers": {server: {"gateway": "core"} for server in path},
        "gateways": ["core"],
        "devices": {name: device(kind, kinds, name) for server, (sw, fw) in path.items()
                    for name, kind, kinds in ((sw, "switch", ["dhcp"]),
                                              (fw, "firewall", ["conntrack", "counters"]))},
        "links": [link for server, (sw, fw) in path.items()
                  for link in ([server, sw], [sw, fw], [fw, "core"])],
        "vms": {"vm1": {"mac": MACS["vm1"], "ipv4": [IPS["vm1"]]}},
    }, indent=1)


@dataclass
class Vm:
    """One guest: its QEMU process(es) and what its console said."""

    name: str
    mac: str
    hv: str
    qemu: QemuGuest
    console: Path
    ip: str | None = None
    old: list[QemuGuest] = field(default_factory=list)

    def console_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.console.read_text(errors="replace")
        return ""


class GuestLab:
    """Build, run and tear down the guest lab (namespaces ``{prefix}-hv1`` ...) in ``workdir``."""

    def __init__(self, prefix: str, workdir: Path, accel: str | None = None) -> None:
        self.hosts = Hosts(prefix)
        self.workdir = workdir
        self.ns = {short: self.hosts.name(short) for short in ("hv1", "hv2", "fw1", "fw2", "srv", "mg")}
        self.agents: dict[str, AgentProcess] = {}
        self.lab_agents: LabAgents | None = None
        self.manager: ManagerProcess | None = None
        self.vms: dict[str, Vm] = {}
        self.journal = workdir / "manager.db"
        self.talker_log = workdir / "talker.jsonl"
        self._accel = accel
        self._guest: guest_build.Guest | None = None
        self._qemus: list[QemuGuest] = []
        self._ports = iter(range(4444, 4500))

    def __enter__(self) -> GuestLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- building -----------------------------------------------------------------------------

    def up(self) -> GuestLab:
        """Namespaces, links, firewalls, the server's dnsmasq and talker, the DHCP relays."""
        h, ns = self.hosts, self.ns
        try:
            self._guest = guest_build.cached() or guest_build.ensure()
            if self._accel is None:
                self._accel = guest_build.accelerator(self._guest)
            for short in ns:
                h.add(short)
            h.addresses(ns["srv"], "lo", [f"{SERVICE_IP}/32"])
            for fw in ("fw1", "fw2"):
                self._firewall(fw)
            for n, hv in enumerate(("hv1", "hv2")):
                h.check(ns[hv], ["ip", "link", "add", "br0", "type", "bridge"])
                h.link_up(ns[hv], "br0")
                h.veth(ns[hv], "up0", ns[f"fw{n + 1}"], "vm0")
                h.check(ns[hv], ["ip", "link", "set", "up0", "master", "br0"])
            h.veth(ns["hv1"], "mig0", ns["hv2"], "mig0", f"{MIG_SRC}/24", f"{MIG_DST}/24")
            self._point_server("10.0.1.0/24", "fw1")
            self._management()
            # Relayed requests arrive on the links from the firewalls; giaddr picks the range.
            start_dnsmasq(h, ns["srv"], "src0", DHCP_FIRST, DHCP_LAST, self.workdir, "dnsmasq",
                          lease="10m", extra=["--interface=dst0", *(
                              f"--dhcp-host={MACS[vm]},{IPS[vm]}" for vm in MACS)])
            for fw in ("fw1", "fw2"):
                self._relay(fw)
            with open(self.talker_log, "wb") as log:
                h.spawn(ns["srv"], [sys.executable, "-m", "xfer.lab.talker", "--port", str(PORT)],
                        stdout=log, stderr=subprocess.STDOUT)
        except BaseException:
            self.down()
            raise
        return self

    def _firewall(self, fw: str) -> None:
        h, name = self.hosts, self.ns[fw]
        up_ip, srv_ip, srv_if = UPLINK[fw]
        h.veth(name, "up0", self.ns["srv"], srv_if, f"{up_ip}/24", f"{srv_ip}/24")
        h.sysctl(name, "net/ipv4/ip_forward", "1")
        h.route(name, f"{SERVICE_IP}/32", srv_ip)
        h.nft(name, firewall_ruleset())
        for key in ("nf_conntrack_tcp_loose", "nf_conntrack_tcp_be_liberal"):
            h.sysctl(name, f"net/netfilter/{key}", "0")

    def _gateway(self, fw: str) -> None:
        # vm0 exists once the hypervisor's uplink is made (in up()).
        h, name = self.hosts, self.ns[fw]
        h.check(name, ["ip", "link", "set", "vm0", "address", GW_MAC])
        h.addresses(name, "vm0", [f"{GW_IP}/24"])
        h.link_up(name, "vm0")

    def _relay(self, fw: str) -> None:
        self._gateway(fw)
        log = open(self.workdir / f"relay-{fw}.log", "wb")  # noqa: SIM115 - handed to the process
        self.hosts.spawn(self.ns[fw], [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            f"--dhcp-relay={GW_IP},{SERVICE_IP}", "--interface=vm0", "--bind-interfaces",
            f"--pid-file={self.workdir / f'relay-{fw}.pid'}", "--user=root", "--group=root",
            "--log-dhcp", "--log-facility=-"], stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _point_server(self, dst: str, fw: str) -> None:
        up_ip, _, srv_if = UPLINK[fw]
        self.hosts.route(self.ns["srv"], dst, up_ip, dev=srv_if, replace=True, src=SERVICE_IP)

    def _management(self) -> None:
        h, mg = self.hosts, self.ns["mg"]
        h.check(mg, ["ip", "link", "add", "br0", "type", "bridge"])
        h.addresses(mg, "br0", [f"{MANAGER_IP}/24"])
        h.link_up(mg, "br0")
        for name, short in (("fw1", "fw1"), ("fw2", "fw2"), ("sw1", "hv1"), ("sw2", "hv2")):
            h.veth(self.ns[short], "ag0", mg, f"m-{short}", f"{AGENT_IPS[name]}/24")
            h.check(mg, ["ip", "link", "set", f"m-{short}", "master", "br0"])

    # --- daemons ------------------------------------------------------------------------------

    def start_agents(self, before: Callable[[], None] | None = None) -> dict[str, AgentProcess]:
        """Agents on sw1, sw2 (DHCP snooping, following ``tap*``), fw1, fw2 (conntrack, counters).

        sw1's agent starts first: the guests' DHCP must meet the snooper. ``before`` runs once it
        listens, while the others start (the demo boots the guests then).
        """
        self.lab_agents = agents = LabAgents(self.hosts, self.workdir)
        devices = {"sw1": ("hv1", ["dhcp"], device_toml((), "up0", ["tap*"])),
                   "sw2": ("hv2", ["dhcp"], device_toml((), "up0", ["tap*"])),
                   "fw1": ("fw1", ["conntrack", "counters"], device_toml(["vm0"])),
                   "fw2": ("fw2", ["conntrack", "counters"], device_toml(["vm0"]))}

        def start(name: str) -> None:
            short, kinds, extra = devices[name]
            # Compiles (snooper, follower, counters) share two cores with booting guests.
            self.agents[name] = agents.start(name, self.ns[short], AGENT_IPS[name], kinds, extra=extra,
                                             timeout=90)

        start("sw1")
        errors: list[BaseException] = []

        def guarded(name: str) -> None:
            try:
                start(name)
            except BaseException as exc:  # reported below, in this thread
                errors.append(exc)

        threads = [threading.Thread(target=guarded, args=(n,)) for n in ("sw2", "fw1", "fw2")]
        for t in threads:
            t.start()
        try:
            if before is not None:
                before()
        finally:
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return self.agents

    def start_manager(self, mode: str = "relay") -> ManagerProcess:
        assert self.lab_agents is not None, "start_agents() first"
        pki.issue(self.lab_agents.pki, "manager", ips=[MANAGER_IP])
        (self.workdir / "topology.yaml").write_text(topology_yaml())
        config = self.workdir / "manager.toml"
        config.write_text(manager_toml(self.journal, mode, MANAGER_IP, MANAGER_PORT))
        self.manager = ManagerProcess(self.hosts, "manager", self.ns["mg"], config,
                                      self.workdir / "manager.log", self.url)
        self.manager.start(60)
        return self.manager

    @property
    def accel(self) -> str | None:
        """``kvm`` or ``tcg`` once ``up()`` has probed."""
        return self._accel

    @property
    def url(self) -> str:
        return f"https://{MANAGER_IP}:{MANAGER_PORT}/v1/migrations"

    def tls_args(self) -> list[str]:
        """``--cacert --cert --key`` of the operator, for ``xfer qemu-hook``."""
        assert self.lab_agents is not None
        p = self.lab_agents.pki
        return ["--cacert", str(p / "ca.pem"), "--cert", str(p / "operator.pem"),
                "--key", str(p / "operator.key")]

    def xfer(self, short: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The CLI as an operator runs it, inside a lab namespace."""
        return self.hosts.run(self.ns[short], [*XFER, *args], timeout=timeout)

    def xfer_json(self, short: str, *args: str) -> Any:
        out = self.xfer(short, *args, "--json")
        if out.returncode != 0:
            raise LabError(f"xfer {' '.join(args)} in {short} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    # --- guests -------------------------------------------------------------------------------

    def _qemu_argv(self, vm: str, mac: str, console: Path) -> list[str]:
        assert self._guest is not None
        ifup = self.workdir / "qemu-ifup"
        if not ifup.exists():
            # QEMU runs it with the new tap's name: the port joins the access switch.
            ifup.write_text('#!/bin/sh\nip link set "$1" master br0\nip link set "$1" up\n')
            ifup.chmod(0o755)
        return ["-kernel", str(self._guest.kernel), "-initrd", str(self._guest.initrd),
                "-append", guest_build.kernel_cmdline(SERVICE_IP, PORT),
                "-serial", f"file:{console}", "-no-reboot",
                "-netdev", f"tap,id=n0,ifname=tap-{vm},script={ifup},downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]

    def _start_qemu(self, vm: str, hv: str, incoming: str | None = None) -> tuple[QemuGuest, Path]:
        tag = f"{vm}-{hv}"
        console = self.workdir / f"{tag}.console"
        qemu = start_guest(self.workdir, tag, incoming=incoming or False, memory_mb=MEMORY_MB,
                           accel=self._accel or "tcg", extra=self._qemu_argv(vm, MACS[vm], console),
                           netns=self.ns[hv])
        self._qemus.append(qemu)
        return qemu, console

    def boot(self, vm: str) -> Vm:
        """Start a guest in hv1; it boots, takes a lease and calls the server on its own."""
        qemu, console = self._start_qemu(vm, "hv1")
        self.vms[vm] = Vm(vm, MACS[vm], "hv1", qemu, console)
        return self.vms[vm]

    def wait_console(self, vm: Vm, event: str, timeout: float = 60) -> str:
        """The first console line ``XFER-GUEST <event> ...``; raises LabError after ``timeout``."""
        pattern = re.compile(rf"^{guest_build.MARK} {re.escape(event)}\b.*$", re.M)
        deadline = time.monotonic() + timeout
        while True:
            found = pattern.search(vm.console_text())
            if found:
                return found.group(0)
            if vm.qemu.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"{vm.name}: no '{event}' on the console:\n{vm.console_text()[-1500:]}"
                               f"\n{vm.qemu.log_text()}")
            time.sleep(0.05)

    def wait_lease(self, vm: Vm, timeout: float = 60) -> str:
        line = self.wait_console(vm, "lease", timeout)
        vm.ip = line.split()[3]
        return vm.ip

    def talk(self, vm: Vm) -> list[Line]:
        """What the server logged for this guest's address."""
        return [line for line in read_log(self.talker_log) if line.peer == vm.ip]

    def migrate(self, vm: Vm, hook: bool, on_resume: Callable[[], None] | None = None,
                timeout: float = 60) -> dict[str, Any]:
        """Live-migrate ``vm`` from hv1 to hv2; with ``hook``, `xfer qemu-hook` owns the window.

        Starts the destination QEMU in hv2 (`-incoming defer`: its tap appears now), then, as the
        hypervisor would, `migrate-incoming` and `migrate`. Returns QEMU's figures (downtime,
        STOP/RESUME times) and, with the hook, its report.
        """
        dst, console = self._start_qemu(vm.name, "hv2", incoming="defer")
        uri = f"tcp:{MIG_DST}:{next(self._ports)}"
        hook_proc = None
        out = self.workdir / f"hook-{vm.name}.json"
        if hook:
            with open(out, "wb") as stdout, open(self.workdir / f"hook-{vm.name}.log", "wb") as err:
                hook_proc = self.hosts.spawn(self.ns["hv1"], [
                    *XFER, "qemu-hook", "--qmp", vm.qemu.qmp, "--vm", vm.name, "--manager", self.url,
                    "--from", SOURCE, "--to", DESTINATION, "--deadline-ms", "5000", "--wait-s", "60",
                    *self.tls_args(), "--json"], stdout=stdout, stderr=err)
        try:
            figures = asyncio.run(_drive(vm.qemu.witness, dst.witness, uri, hook, on_resume, timeout))
        finally:
            if hook_proc is not None:
                try:
                    hook_proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    hook_proc.kill()
        if hook_proc is not None:
            text = out.read_text()
            figures["hook"] = json.loads(text) if text.strip() else {
                "error": (self.workdir / f"hook-{vm.name}.log").read_text()[-500:]}
            figures["hook_rc"] = hook_proc.returncode
        vm.old.append(vm.qemu)
        vm.qemu, vm.console, vm.hv = dst, console, "hv2"
        return figures

    def point_server_at_destination(self, vm: Vm) -> None:
        """The network converges on the guest's new path: its host route via fw2."""
        assert vm.ip is not None
        self._point_server(f"{vm.ip}/32", "fw2")

    # --- witnesses ----------------------------------------------------------------------------

    def bindings(self, sw: str) -> list[dict[str, Any]]:
        """``xfer dhcp bindings`` of an access switch (sw1 is hv1's bridge, sw2 hv2's)."""
        hv = SWITCH_HOST[sw]
        rows: list[dict[str, Any]] = self.xfer_json(hv, "dhcp", "bindings", "--netns", self.ns[hv])
        return rows

    def snoop_counters(self, sw: str) -> dict[str, dict[str, int]]:
        hv = SWITCH_HOST[sw]
        counters: dict[str, dict[str, int]] = self.xfer_json(hv, "dhcp", "counters", "--netns", self.ns[hv])
        return counters

    def follow_latency_ms(self, sw: str, port: str) -> float | None:
        """How long after the kernel announced ``port`` the switch's agent snooped it (its log)."""
        agent = self.agents.get(sw)
        found = re.findall(rf"snooping new port {re.escape(port)} \(([0-9.]+) ms\)",
                           agent.log_text() if agent else "")
        return float(found[-1]) if found else None

    def counters(self, fw: str, vm: Vm) -> dict[str, int] | None:
        rows = self.xfer_json(fw, "counters", "show", "--netns", self.ns[fw])
        mine = [r for r in rows if r["mac"] == vm.mac and r["ip"] == vm.ip]
        return {k: v for k, v in mine[0].items() if k not in ("mac", "ip")} if mine else None

    def conntrack_has(self, fw: str, vm: Vm) -> bool:
        """conntrack(8) as the independent witness."""
        assert vm.ip is not None
        return vm.ip in self.hosts.run(self.ns[fw], ["conntrack", "-L", "-s", vm.ip]).stdout

    def migrations(self) -> list[dict[str, Any]]:
        out = self.xfer("mg", "migrations", "--journal", str(self.journal), "--json")
        if out.returncode != 0:
            raise LabError(f"xfer migrations failed: {out.stderr.strip()}")
        result: list[dict[str, Any]] = json.loads(out.stdout)
        return result

    def wait_outcome(self, migration: int, timeout: float = 30) -> dict[str, Any]:
        """The journal's record of a migration once it has an outcome (the source is cleaned
        after the manager answered, so a little later than the window)."""
        deadline = time.monotonic() + timeout
        while True:
            rec = next((m for m in self.migrations() if m["id"] == migration), {})
            if rec.get("outcome") or time.monotonic() > deadline:
                return rec
            time.sleep(0.1)

    # --- teardown -----------------------------------------------------------------------------

    def down(self) -> None:
        """Stop QEMU, dnsmasq, agents, manager; remove namespaces and pins, also a crashed run's."""
        for qemu in self._qemus:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                qemu.stop()
        self._qemus.clear()
        for name in self.ns.values():
            self.hosts.adopt(name)
        self.hosts.close()
        with contextlib.suppress(XferError, OSError, ImportError):
            from xfer.counters import device as counters_device

            for fw in ("fw1", "fw2"):
                # Pins and the import lock file outlive the namespace otherwise.
                counters_device.detach("vm0", self.ns[fw], unpin=True)
        unpin(list(self.ns.values()))
        with contextlib.suppress(XferError, OSError):
            from xfer.dhcp import datapath
            from xfer.dhcp.store import pin_dir

            for hv in ("hv1", "hv2"):
                datapath.unpin(pin_dir(self.ns[hv]))


async def _drive(src_path: str, dst_path: str, uri: str, hooked: bool,
                 on_resume: Callable[[], None] | None, timeout: float) -> dict[str, Any]:
    """The hypervisor's part of a migration, on the witness monitors: start it, watch it."""
    from xfer.hypervisor import window
    from xfer.hypervisor.qmp import QmpClient

    async with QmpClient(src_path) as src, QmpClient(dst_path) as dst:
        if hooked:
            # `xfer qemu-hook` arms pause-before-switchover; migrate only once it has.
            async with window.within(60, "xfer qemu-hook did not arm the source"):
                while not (await window.capabilities(src)).get(window.PAUSE):
                    await asyncio.sleep(0.02)
        await window.set_capabilities(src, {window.EVENTS: True})
        since_src, since_dst = len(src.events), len(dst.events)
        await dst.execute("migrate-incoming", {"uri": uri})
        started = time.time()
        await src.execute("migrate", {"uri": uri})
        async with window.within(timeout, "the guest did not resume at the destination"):
            resumed = await dst.wait_event(lambda e: e.name == "RESUME", None, since_dst)
        if on_resume is not None:
            await asyncio.to_thread(on_resume)
        status = await window.wait_finished(src, since_src, timeout)
        info = await window.completed_info(src) if status == "completed" else {}
        stop = next((e for e in src.events[since_src:] if e.name == "STOP"), None)
    return {"status": status, "started": started, "downtime_ms": info.get("downtime"),
            "total_time_ms": info.get("total-time"),
            "stop_ts": stop.timestamp if stop else None, "resume_ts": resumed.timestamp,
            "guest_gap_ms": round((resumed.timestamp - stop.timestamp) * 1000, 3) if stop else None}
