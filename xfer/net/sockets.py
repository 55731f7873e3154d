"""Sockets bound inside a namespace: the daemons' TCP listeners, and UDP for the migration
messages' datagrams, unicast and multicast.

The manager listens on both UDP forms; an agent of the device-driven variant joins
the multicast group only. Entering the namespace needs CAP_SYS_ADMIN (setns); the
socket stays in it afterwards.

    sock = bind_socket("10.0.4.1", 7443, "xfer-fwsrc")
    sock = multicast_socket("239.7.7.7", 8702, "10.0.4.1", "xfer-fwsrc")
"""

from __future__ import annotations

import socket
import struct

from xfer import netns as xnetns
from xfer.errors import UsageError


def bind_socket(address: str, port: int, namespace: str | None) -> socket.socket:
    """A listening TCP socket bound inside ``namespace`` (CAP_SYS_ADMIN to enter it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with xnetns.entered(namespace):
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {address}:{port}"
                         f"{f' in {namespace}' if namespace else ''}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def udp_socket(address: str, port: int, namespace: str | None) -> socket.socket:
    """A UDP socket bound inside ``namespace`` (CAP_SYS_ADMIN to enter it)."""
    with xnetns.entered(namespace):
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on udp {address}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def multicast_socket(group: str, port: int, interface: str, namespace: str | None) -> socket.socket:
    """A UDP socket on ``port`` that joined IPv4 ``group`` on the interface owning ``interface``."""
    sock = udp_socket("0.0.0.0", port, namespace)
    try:
        mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot join multicast group {group} on {interface}: {exc.strerror}") from None
    return sock
