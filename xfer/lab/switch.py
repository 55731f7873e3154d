"""A DHCP-snooping switch in namespaces, a DHCP server for it, and raw Ethernet frames.

    <name> (the device): bridge br0 with ports
        uplink  ── <name>srv:eth0   10.50.0.1/24, the DHCP server side (trusted)
        p-<vm>  ── <name><vm>:eth0  one per VM (untrusted)

Used by the DHCP netns tests and ``xfer bench dhcp``. Needs root.

    with Hosts("demo") as h:
        net = build_switch(h, vms=("vm",))
        start_dnsmasq(h, net.srv, "eth0", "10.50.0.100", "10.50.0.150", Path("/tmp/d"), "real")
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xfer import netns
from xfer.dhcp import packet
from xfer.lab.hosts import Hosts, LabError

SERVER_IP = "10.50.0.1"
NET = "10.50.0"
ETH_P_ALL = 0x0003


class Wire:
    """A packet socket on one interface inside a namespace: send and sniff raw frames.

    Needs CAP_NET_RAW. The socket stays in ``ns`` after the constructor returns.
    """

    def __init__(self, ns: str, ifname: str) -> None:
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((ifname, 0))
        self.mac = ":".join(f"{b:02x}" for b in self.sock.getsockname()[4][:6])

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        """The first incoming frame that ``match``es within ``timeout`` seconds, or None."""
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
    """A DHCP client message as a VM broadcasts it."""
    return udp_frame(mac, packet.BROADCAST, src, dst, 68, 67, msg, udp_len)


def server_frame(srv_mac: str, client_mac: str, msg: bytes, dst: str = "255.255.255.255",
                 udp_len: int | None = None) -> bytes:
    """A DHCP server message to one client, from SERVER_IP."""
    return udp_frame(srv_mac, client_mac, SERVER_IP, dst, 67, 68, msg, udp_len)


@dataclass
class SwitchNet:
    hosts: Hosts
    sw: str
    srv: str
    vms: dict[str, str] = field(default_factory=dict)   # short name -> namespace

    @staticmethod
    def port(vm: str) -> str:
        return f"p-{vm}"


def build_switch(hosts: Hosts, vms: Sequence[str] = ("vm",), name: str = "sw") -> SwitchNet:
    """The bridge, its server side and one namespace per VM (VMs get no address)."""
    net = SwitchNet(hosts, hosts.add(name), hosts.add(f"{name}srv"))
    hosts.check(net.sw, ["ip", "link", "add", "br0", "type", "bridge"])
    hosts.veth(net.sw, "uplink", net.srv, "eth0", (), f"{SERVER_IP}/24")
    for vm in vms:
        net.vms[vm] = hosts.add(f"{name}{vm}")
        hosts.veth(net.sw, net.port(vm), net.vms[vm], "eth0")
    for port in ["uplink", *(net.port(v) for v in vms)]:
        hosts.check(net.sw, ["ip", "link", "set", "dev", port, "master", "br0"])
    hosts.link_up(net.sw, "br0")
    return net


def start_dnsmasq(hosts: Hosts, ns: str, iface: str, first: str, last: str, tmp: Path,
                  tag: str, lease: str = "2m") -> subprocess.Popen[bytes]:
    """dnsmasq serving DHCP only (no DNS, no config files), bound to ``iface`` in ``ns``.

    Its lease, pid and log files are ``tmp/<tag>.*``; ``hosts.close()`` stops it.
    """
    log = open(tmp / f"{tag}.log", "wb")  # noqa: SIM115 - handed to the process
    proc = hosts.spawn(ns, [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
        f"--interface={iface}", "--bind-interfaces", "--except-interface=lo",
        f"--dhcp-range={first},{last},255.255.255.0,{lease}", "--dhcp-authoritative",
        f"--dhcp-leasefile={tmp / (tag + '.leases')}", f"--pid-file={tmp / (tag + '.pid')}",
        "--user=root", "--group=root", "--log-dhcp", "--log-facility=-"],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    time.sleep(0.3)   # it binds its DHCP socket right after start
    if proc.poll() is not None:
        raise LabError("dnsmasq did not start: " + (tmp / f"{tag}.log").read_text())
    return proc
