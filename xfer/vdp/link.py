"""The raw sockets on the switch's host-facing ports: the only kernel-facing code of xfer.vdp.

One AF_PACKET socket per port, opened inside the device's namespace (CAP_SYS_ADMIN
to enter it, CAP_NET_RAW for the socket; the socket stays bound to its port
afterwards), receiving ethertype 0x8940 only (a classic BPF filter) and joined to
the nearest-bridge group address.

    port = open_port("sw1", "p1")
    port.send(frame_bytes); raw = port.recv()
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from dataclasses import dataclass

from xfer import netns as xnetns
from xfer.errors import KernelError, PermissionDenied, UsageError
from xfer.vdp.frame import ETH_P_ECP, MAX_FRAME, NEAREST_BRIDGE

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_MULTICAST = 0
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
# ldh [12]; jeq #0x8940, accept, drop; accept: ret #0x40000; drop: ret #0
_ECP_ONLY = ((0x28, 0, 0, 12), (0x15, 0, 1, ETH_P_ECP), (0x06, 0, 0, 0x40000), (0x06, 0, 0, 0))


@dataclass
class Port:
    """An open port: its name, its own MAC and the socket (non-blocking)."""

    name: str
    mac: bytes
    sock: socket.socket

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self) -> bytes | None:
        """One received frame, or None when nothing is waiting. Frames we sent are skipped."""
        while True:
            try:
                data, addr = self.sock.recvfrom(MAX_FRAME + 1)
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            if addr[2] != PACKET_OUTGOING:
                return data

    def send(self, frame: bytes) -> None:
        """Transmit one frame; a port that is down loses it (the peer retransmits, so do we)."""
        try:
            self.sock.send(frame)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV, errno.ENOBUFS):
                raise KernelError(exc.errno or 0, f"send on port {self.name}") from None

    def close(self) -> None:
        self.sock.close()


def open_port(namespace: str | None, ifname: str) -> Port:
    """Bind a raw ECP socket to ``ifname`` in ``namespace``; UsageError if there is no such port."""
    with xnetns.entered(namespace):
        try:
            # Protocol 0: the socket receives nothing until bound, after its filter is attached.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise PermissionDenied("a raw packet socket needs CAP_NET_RAW (run as root)") from None
        try:
            _attach_filter(sock)
        except OSError as exc:
            sock.close()
            raise KernelError(exc.errno or 0, "attach the ECP filter to a packet socket") from None
        try:
            # NOTE: bound to ETH_P_ALL, not 0x8940. A socket for one ethertype is served after
            # the port's rx_handler; on a port enslaved to a Linux bridge with STP off the
            # bridge forwards 01:80:c2:00:00:00 frames and consumes them, so such a socket never
            # sees a station's request (measured: the station's "Ack not received from bridge").
            # ETH_P_ALL taps run before the rx_handler; the filter keeps only ECP.
            sock.bind((ifname, ETH_P_ALL))
            index = socket.if_nametoindex(ifname)
        except OSError as exc:
            sock.close()
            where = f" in namespace {namespace!r}" if namespace else ""
            raise UsageError(f"no port {ifname!r}{where}: {exc.strerror or exc}") from None
    try:
        # NOTE: veth and most drivers deliver 01:80:c2:00:00:00 anyway, but a NIC with a
        # multicast filter drops group frames nobody joined: join the nearest-bridge address.
        mreq = struct.pack("iHH8s", index, PACKET_MR_MULTICAST, 6, NEAREST_BRIDGE)
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        mac = bytes(sock.getsockname()[4])[:6]
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise KernelError(exc.errno or 0, f"set up the raw socket on port {ifname}") from None
    if len(mac) != 6:
        sock.close()
        raise UsageError(f"port {ifname!r} is not an Ethernet port")
    return Port(ifname, mac, sock)


def _attach_filter(sock: socket.socket) -> None:
    program = b"".join(struct.pack("HBBI", *insn) for insn in _ECP_ONLY)
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(_ECP_ONLY), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


_CAP_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_CAP_LAST = 63


def drop_privileges() -> None:
    """Give up every capability once the ports are open (``xfer vdp serve``).

    The raw sockets keep working without any; what parses the network afterwards
    (frames, the manager's answers) then runs unprivileged. The bounding set is
    emptied first (that needs CAP_SETPCAP, so it comes before the capset), so that no
    later exec could regain anything. Only threads started afterwards inherit the
    drop: call it before any worker thread exists. Files owned by root stay writable
    (the sequence file), since uid 0 still owns them.

        port = open_port("sw1", "p1"); drop_privileges()
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    for cap in range(_CAP_LAST + 1):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)     # EINVAL past the kernel's last cap: fine
    header = struct.pack("Ii", _CAP_VERSION_3, 0)
    data = ctypes.create_string_buffer(4 * 3 * 2)   # effective, permitted, inheritable x 2: all zero
    if libc.capset(ctypes.c_char_p(header), data) != 0:
        err = ctypes.get_errno()
        raise KernelError(err, "capset (dropping capabilities)")
