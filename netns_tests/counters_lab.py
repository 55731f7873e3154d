"""Helpers for the counters kernel tests: a VM behind a firewall, an exact frame witness.

The firewall namespace counts on ``vmif``, its end of the veth to the VM. ARP and
IPv6 neighbours are static on both ends so that no resolution traffic from the
VM's addresses mixes into the counts (ARP is not IP and never counted anyway;
IPv6 neighbour solicitations from the VM's global address would be).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from xfer import netns as xnetns
from xfer.counters import device as counters_device
from xfer.counters import model as counters
from xfer.errors import XferError
from xfer.lab.hosts import Hosts

VM_MAC = "02:00:00:00:00:02"
FW_MAC = "02:00:00:00:00:01"
VM_IP4, FW_IP4 = "10.9.0.2", "10.9.0.1"
VM_IP6, FW_IP6 = "fd00:9::2", "fd00:9::1"
DEV = "vmif"
_PACKET_OUTGOING = 4
_SOL_PACKET, _PACKET_STATISTICS = 263, 6


@dataclass
class Site:
    """A VM namespace wired to a firewall namespace that counts on ``vmif``."""

    hosts: Hosts
    vm: str
    fw: str
    attached: list[tuple[str, str]] = field(default_factory=list)

    def attach(self) -> None:
        counters_device.attach(DEV, self.fw)
        if (DEV, self.fw) not in self.attached:
            self.attached.append((DEV, self.fw))

    def link_stat(self, ns: str, ifname: str, name: str) -> int:
        """One of the interface's statistics (``tx_dropped``...) as its namespace sees it."""
        return int(self.hosts.check(ns, ["cat", f"/sys/class/net/{ifname}/statistics/{name}"]))

    def ping(self, count: int, ip: str = FW_IP4) -> None:
        argv = ["ping", "-q", "-c", str(count), "-i", "0.005", "-W", "2", ip]
        self.hosts.check(self.vm, argv, timeout=60)

    def totals(self) -> dict[tuple[str, str], dict[str, int]]:
        """``{(mac, ip): {field: n}}`` as the device holds them."""
        from xfer.counters import transfer as counters_transfer

        rows = counters.rows(counters_transfer.show(None, self.fw))
        return {(r["mac"], r["ip"]): {f: r[f] for f in counters.FIELDS} for r in rows}


def build_site(hosts: Hosts, vm_short: str, fw_short: str, offloads: bool = False) -> Site:
    """VM ``eth0`` (VM_MAC, VM_IP4/6) ↔ firewall ``vmif`` (FW_MAC, FW_IP4/6), static neighbours.

    Offloads are off unless asked for, so one skb is one wire frame.
    """
    vm, fw = hosts.add(vm_short), hosts.add(fw_short)
    hosts.veth(vm, "eth0", fw, DEV)
    for ns, ifname, mac, addrs, peer_mac, peers in (
        (vm, "eth0", VM_MAC, [f"{VM_IP4}/24", f"{VM_IP6}/64"], FW_MAC, [FW_IP4, FW_IP6]),
        (fw, DEV, FW_MAC, [f"{FW_IP4}/24", f"{FW_IP6}/64"], VM_MAC, [VM_IP4, VM_IP6]),
    ):
        hosts.check(ns, ["ip", "link", "set", ifname, "down"])
        hosts.check(ns, ["ip", "link", "set", ifname, "address", mac])
        hosts.addresses(ns, ifname, addrs)
        hosts.link_up(ns, ifname)
        for peer in peers:
            hosts.check(ns, ["ip", "neigh", "replace", peer, "lladdr", peer_mac, "dev", ifname,
                             "nud", "permanent"])
        if not offloads:
            no_offloads(ns, ifname)
    return Site(hosts, vm, fw)


def no_offloads(ns: str, ifname: str) -> None:
    from pyroute2.ethtool import Ethtool

    with xnetns.entered(ns):
        eth = Ethtool()
        try:
            feats = eth.get_features(ifname)
            for name, feat in feats.features.items():
                if name.endswith("segmentation") or name == "rx-gro":
                    feat.enable = False
            eth.set_features(ifname, feats)
        finally:
            eth.close()


@contextlib.contextmanager
def counting(site: Site) -> Iterator[Site]:
    """Attach on the site's firewall; always detach and remove the pins afterwards."""
    try:
        site.attach()
        yield site
    finally:
        for dev, ns in site.attached:
            # the namespace may be half built: detach still removes pins and lock
            with contextlib.suppress(XferError):
                counters_device.detach(dev, ns, unpin=True)


class Witness:
    """Counts frames on an interface with an AF_PACKET socket: independent of our program.

    Taps see ingress frames before tc ingress and egress frames after tc egress,
    the same skbs the program counts.
    """

    def __init__(self, ns: str, ifname: str) -> None:
        with xnetns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
            self.sock.bind((ifname, 0))
        self.sock.setblocking(False)
        self.table: dict[tuple[str, str], list[int]] = {}
        self.tcp_payload: dict[tuple[str, str], int] = {}

    def drain(self) -> None:
        while True:
            try:
                frame, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return
            self._count(frame, addr[2] == _PACKET_OUTGOING)

    def drops(self) -> int:
        raw = self.sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        return struct.unpack("II", raw)[1]

    def close(self) -> None:
        self.sock.close()

    def _count(self, frame: bytes, egress: bool) -> None:
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        mac = frame[0:6] if egress else frame[6:12]
        if ethertype == 0x0800:
            ihl = (frame[14] & 0x0F) * 4
            proto = frame[23]
            addr = frame[30:34] if egress else frame[26:30]
            ip_total, l4 = struct.unpack_from("!H", frame, 16)[0], 14 + ihl
            ip = socket.inet_ntop(socket.AF_INET, addr)
        elif ethertype == 0x86DD:
            proto = frame[20]
            addr = frame[38:54] if egress else frame[22:38]
            ip_total, l4 = 40 + struct.unpack_from("!H", frame, 18)[0], 54
            ip = socket.inet_ntop(socket.AF_INET6, addr)
        else:
            return
        key = (":".join(f"{b:02x}" for b in mac), ip)
        row = self.table.setdefault(key, [0] * len(counters.FIELDS))
        base = 2 if egress else 0
        row[base] += 1
        row[base + 1] += len(frame)
        if proto == 6:
            flags = frame[l4 + 13]
            if not egress and flags & 0x12 == 0x02:
                row[4] += 1
            elif not egress and flags & 0x12 == 0x12:
                row[5] += 1
            payload = ip_total - (l4 - 14) - (frame[l4 + 12] >> 4) * 4
            self.tcp_payload[key] = self.tcp_payload.get(key, 0) + payload


@dataclass
class Conversation:
    """What one TCP transfer did, as the two endpoints' TCP stacks tell it (TCP_INFO)."""

    received: int = 0
    client_segs_out: int = 0   # every segment the client sent, SYN included, in wire segments
    client_bytes_sent: int = 0  # payload bytes
    server_segs_out: int = 0   # the SYN-ACK is sent by the listener's request sock: not included
    server_bytes_sent: int = 0
    retransmits: int = 0       # both ends; a retransmission may carry SACK options


def _tcp_info(sock: socket.socket) -> tuple[int, int, int]:
    """(tcpi_segs_out, tcpi_bytes_sent, tcpi_total_retrans) of struct tcp_info."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return (struct.unpack_from("I", info, 136)[0], struct.unpack_from("Q", info, 200)[0],
            struct.unpack_from("I", info, 100)[0])


def tcp_transfer(client_ns: str, server_ns: str, server_ip: str, size: int) -> Conversation:
    """Send ``size`` bytes over one TCP connection client → server, both ends closing cleanly."""
    family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
    with xnetns.entered(server_ns):
        srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((server_ip, 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]
    conv = Conversation()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                conv.received += len(chunk)
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.2)  # the client's ACK of our FIN
            conv.server_segs_out, conv.server_bytes_sent, retrans = _tcp_info(conn)
            conv.retransmits += retrans

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with xnetns.entered(client_ns):
            cli = socket.socket(family, socket.SOCK_STREAM)
        with cli:
            cli.connect((server_ip, port))
            cli.sendall(b"x" * size)
            cli.shutdown(socket.SHUT_WR)
            cli.recv(1)  # the server's FIN: our ACK of it is sent before recv returns
            conv.client_segs_out, conv.client_bytes_sent, retrans = _tcp_info(cli)
            conv.retransmits += retrans
    finally:
        thread.join(10)
        srv.close()
    return conv
