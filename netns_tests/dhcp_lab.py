"""A DHCP-snooping switch in namespaces, real DHCP peers, and raw-frame helpers.

    sw (device): bridge br0 with ports  uplink ── srv:eth0 (10.50.0.1, the DHCP server side)
                                        p-<vm> ── <vm>:eth0   (untrusted, one per VM)

Everything lives under the test's ``Hosts`` and temp dir; ``cleanup`` unpins the
maps of every namespace the test made.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xfer import netns
from xfer.dhcpsnoop import datapath, packet
from xfer.dhcpsnoop.store import pin_dir
from xfer.lab.hosts import Hosts

SERVER_IP = "10.50.0.1"
NET = "10.50.0"
ETH_P_ALL = 0x0003


class Wire:
    """A packet socket on one interface inside a namespace: send and sniff raw frames."""

    def __init__(self, ns: str, ifname: str) -> None:
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((ifname, 0))
        self.mac = ":".join(f"{b:02x}" for b in self.sock.getsockname()[4][:6])

    def close(self) -> None:
        self.sock.close()

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def drain(self) -> None:
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(65535)
        self.sock.setblocking(True)

    def wait_for(self, match: Callable[[bytes], bool], timeout: float = 1.0) -> bytes | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                frame, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                return None
            if addr[2] != socket.PACKET_OUTGOING and match(frame):
                return frame
        return None


def udp_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int,
              payload: bytes, udp_len: int | None = None) -> bytes:
    return packet.ethernet(dst_mac, src_mac, 0x0800,
                           packet.ipv4_udp(src, dst, sport, dport, payload, udp_len))


def client_frame(mac: str, msg: bytes, src: str = "0.0.0.0", dst: str = "255.255.255.255",
                 udp_len: int | None = None) -> bytes:
    """A DHCP client message as the VM would broadcast it."""
    return udp_frame(mac, packet.BROADCAST, src, dst, 68, 67, msg, udp_len)


def server_frame(srv_mac: str, client_mac: str, msg: bytes, dst: str = "255.255.255.255",
                 udp_len: int | None = None) -> bytes:
    return udp_frame(srv_mac, client_mac, SERVER_IP, dst, 67, 68, msg, udp_len)


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
        from xfer.dhcpsnoop import device

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
        from xfer.dhcpsnoop.store import BindingTable

        with BindingTable(self.sw) as table:
            return table.counters().get(port, {})

    def ping(self, vm: str, dst: str = SERVER_IP) -> bool:
        return self.hosts.run(self.vms[vm], ["ping", "-c1", "-W1", dst]).returncode == 0

    # --- real DHCP peers ------------------------------------------------------------

    def dnsmasq(self, ns: str, iface: str, first: str, last: str, tag: str,
                lease: str = "2m") -> subprocess.Popen[bytes]:
        """dnsmasq serving DHCP only (no DNS), bound to ``iface``, files in the temp dir."""
        log = open(self.tmp / f"{tag}.log", "wb")  # noqa: SIM115 - the process owns it
        proc = self.hosts.spawn(ns, [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            f"--interface={iface}", "--bind-interfaces", "--except-interface=lo",
            f"--dhcp-range={first},{last},255.255.255.0,{lease}", "--dhcp-authoritative",
            f"--dhcp-leasefile={self.tmp / (tag + '.leases')}",
            f"--pid-file={self.tmp / (tag + '.pid')}", "--user=root", "--group=root",
            "--log-dhcp", "--log-facility=-"], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        time.sleep(0.3)   # dnsmasq binds its DHCP socket right after start
        assert proc.poll() is None, (self.tmp / f"{tag}.log").read_text()
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

    def dhclient(self, vm: str) -> subprocess.Popen[bytes]:
        """A foreground dhclient in the VM (it stays to renew); returns once it has a lease."""
        log = open(self.tmp / f"{vm}.dhclient.log", "wb")  # noqa: SIM115
        proc = self.hosts.spawn(self.vms[vm], ["dhclient", "-4", "-d", "-v",
                                               *self._dhclient_files(vm), "eth0"],
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.vm_ip(vm):
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

    def vm_ip(self, vm: str) -> str | None:
        out = self.hosts.check(self.vms[vm], ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
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
    sw = hosts.add(name)
    srv = hosts.add(f"{name}srv")
    hosts.check(sw, ["ip", "link", "add", "br0", "type", "bridge"])
    hosts.veth(sw, "uplink", srv, "eth0", (), f"{SERVER_IP}/24")
    lab = SwitchLab(hosts, tmp, sw, srv, {})
    for vm in vms:
        ns = hosts.add(f"{name}{vm}")
        hosts.veth(sw, lab.port(vm), ns, "eth0")
        lab.vms[vm] = ns
    for port in ["uplink", *(lab.port(v) for v in vms)]:
        hosts.check(sw, ["ip", "link", "set", "dev", port, "master", "br0"])
    hosts.link_up(sw, "br0")
    return lab


def cleanup(hosts: Hosts) -> None:
    """Unpin the maps of every namespace of the test (the namespaces go with ``hosts``)."""
    for ns in list(hosts.namespaces):
        with contextlib.suppress(Exception):
            datapath.detach(ns, purge=True)
        datapath.unpin(pin_dir(ns))
