"""Test conveniences over ``xfer.lab.switch``: real dhclient, the CLI, pings, cleanup.

Everything lives under the test's ``Hosts`` and temp dir; ``cleanup`` unpins the
maps of every namespace the test made.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from xfer.dhcp import datapath, packet
from xfer.dhcp.store import pin_dir
from xfer.lab import switch
from xfer.lab.hosts import Hosts
from xfer.lab.switch import (  # noqa: F401 - re-exported for the tests
    NET,
    SERVER_IP,
    Wire,
    client_frame,
    server_frame,
    start_dnsmasq,
    udp_frame,
)


@dataclass
class SwitchLab:
    hosts: Hosts
    tmp: Path
    sw: str
    srv: str
    vms: dict[str, str]                 # short name -> namespace
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def port(self, vm: str) -> str:
        return f"p-{vm}"

    def mac(self, ns: str, ifname: str = "eth0") -> str:
        return self.hosts.check(ns, ["cat", f"/sys/class/net/{ifname}/address"]).strip()

    def attach(self, mode: str = "enforce", untrusted: Sequence[str] | None = None) -> None:
        from xfer.dhcp import device

        ports = [self.port(v) for v in (untrusted or self.vms)]
        device.attach(self.sw, ["uplink"], ports, mode)

    def xfer(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "xfer.cli", *args], capture_output=True,
                              text=True, timeout=60, env=os.environ.copy(), check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"xfer {' '.join(args)} failed: {proc.stderr}")
        return proc

    def bindings(self) -> list[dict[str, object]]:
        return json.loads(self.xfer("dhcp", "bindings", "--netns", self.sw, "--json").stdout)

    def counters(self, port: str) -> dict[str, int]:
        from xfer.dhcp.store import BindingTable

        with BindingTable(self.sw) as table:
            return table.counters().get(port, {})

    def ping(self, vm: str, dst: str = SERVER_IP) -> bool:
        return self.hosts.run(self.vms[vm], ["ping", "-c1", "-W1", dst]).returncode == 0

    # --- real DHCP peers ------------------------------------------------------------

    def dnsmasq(self, ns: str, iface: str, first: str, last: str, tag: str,
                lease: str = "2m") -> subprocess.Popen[bytes]:
        proc = start_dnsmasq(self.hosts, ns, iface, first, last, self.tmp, tag, lease)
        self.procs.append(proc)
        return proc

    def _dhclient_files(self, vm: str) -> list[str]:
        script = self.tmp / "dhclient-script"
        if not script.exists():
            # Our own script: dhclient-script would rewrite the host's /etc/resolv.conf.
            script.write_text(
                '#!/bin/sh\ncase "$reason" in\n'
                '  PREINIT) ip link set dev "$interface" up ;;\n'
                '  BOUND|RENEW|REBIND|REBOOT) ip -4 addr flush dev "$interface";'
                ' ip addr add "$new_ip_address/24" dev "$interface" ;;\n'
                '  EXPIRE|FAIL|RELEASE|STOP) ip -4 addr flush dev "$interface" ;;\n'
                'esac\nexit 0\n')
            script.chmod(0o755)
            (self.tmp / "dhclient.conf").write_text(
                "timeout 6;\nretry 60;\ninitial-interval 1;\nbackoff-cutoff 2;\n")
        return ["-cf", str(self.tmp / "dhclient.conf"), "-lf", str(self.tmp / f"{vm}.leases"),
                "-pf", str(self.tmp / f"{vm}.dhclient.pid"), "-sf", str(script)]

    def dhclient(self, vm: str, iface: str = "eth0") -> subprocess.Popen[bytes]:
        """A foreground dhclient in the VM (it stays to renew); returns once it has a lease."""
        log = open(self.tmp / f"{vm}.dhclient.log", "wb")  # noqa: SIM115
        proc = self.hosts.spawn(self.vms[vm], ["dhclient", "-4", "-d", "-v",
                                               *self._dhclient_files(vm), iface],
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.vm_ip(vm, iface):
                return proc
            assert proc.poll() is None, (self.tmp / f"{vm}.dhclient.log").read_text()
            time.sleep(0.1)
        raise AssertionError("no lease: " + (self.tmp / f"{vm}.dhclient.log").read_text())

    def dhclient_once(self, vm: str) -> int:
        """One dhclient attempt (-1): 0 with a lease, 2 without, after the conf's timeout."""
        return self.hosts.run(self.vms[vm], ["dhclient", "-4", "-1", "-v",
                                             *self._dhclient_files(vm), "eth0"]).returncode

    def release(self, vm: str) -> None:
        self.hosts.check(self.vms[vm], ["dhclient", "-4", "-r", "-v",
                                        *self._dhclient_files(vm), "eth0"])

    def vm_ip(self, vm: str, iface: str = "eth0") -> str | None:
        out = self.hosts.check(self.vms[vm], ["ip", "-4", "-o", "addr", "show", "dev", iface])
        for line in out.splitlines():
            return line.split()[3].split("/")[0]
        return None

    def set_ip(self, vm: str, ip: str) -> None:
        self.hosts.check(self.vms[vm], ["ip", "-4", "addr", "flush", "dev", "eth0"])
        self.hosts.check(self.vms[vm], ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])

    # --- crafted exchanges ----------------------------------------------------------

    def crafted_lease(self, vm: str, ip: str, lease: int, configure: bool = True) -> None:
        """REQUEST from the VM, ACK from the server side, both crafted; then use the address."""
        vm_wire, srv_wire = Wire(self.vms[vm], "eth0"), Wire(self.srv, "eth0")
        try:
            vm_mac = vm_wire.mac
            vm_wire.send(client_frame(vm_mac, packet.build(1, packet.REQUEST, vm_mac,
                                                           requested=ip)))
            time.sleep(0.05)   # let the REQUEST's port be learned before the ACK
            srv_wire.send(server_frame(srv_wire.mac, vm_mac, packet.build(
                2, packet.ACK, vm_mac, yiaddr=ip, lease=lease, server=SERVER_IP)))
            time.sleep(0.05)
        finally:
            vm_wire.close()
            srv_wire.close()
        if configure:
            self.set_ip(vm, ip)

    def stop_processes(self) -> None:
        from xfer.lab.hosts import stop_process

        for proc in self.procs:
            stop_process(proc)


def build_switch(hosts: Hosts, tmp: Path, vms: Sequence[str] = ("vm",), name: str = "sw"
                 ) -> SwitchLab:
    net = switch.build_switch(hosts, vms, name)
    return SwitchLab(hosts, tmp, net.sw, net.srv, dict(net.vms))


@contextlib.contextmanager
def switches(hosts: Hosts, tmp: Path, monkeypatch: pytest.MonkeyPatch,
             *specs: tuple[str, Sequence[str]]) -> Iterator[list[SwitchLab]]:
    """Build one switch lab per (name, VMs); stop their processes and unpin on the way out.

    The snooping database goes to the test's temp dir, never /var/lib.
    """
    monkeypatch.setenv("XFER_DHCP_STATE_DIR", str(tmp / "db"))
    labs: list[SwitchLab] = []
    try:
        for name, vms in specs:
            labs.append(build_switch(hosts, tmp, vms, name))
        yield labs
    finally:
        for lab in labs:
            lab.stop_processes()
        cleanup(hosts)


def cleanup(hosts: Hosts) -> None:
    """Unpin the maps of every namespace of the test (the namespaces go with ``hosts``)."""
    for ns in list(hosts.namespaces):
        with contextlib.suppress(Exception):
            datapath.detach(ns, purge=True)
        datapath.unpin(pin_dir(ns))
    left = [d for d in (os.path.dirname(pin_dir(ns)) for ns in hosts.namespaces)
            if os.path.exists(d)]
    assert not left, f"pinned directories left behind: {left}"
