"""DHCP messages: a builder for tests and benchmarks, and a reference parser.

The datapath (xfer/ebpf/dhcpsnoop.bpf.c) parses DHCP itself; ``parse`` here
follows exactly the same rules so they can be unit-tested without root, and the
netns tests send the same malformed messages to the real program:

- fixed header of 236 bytes, htype 1 / hlen 6, then the magic cookie;
- options walked until END (255), at most MAX_OPTIONS of them, PAD skipped;
- only options 50 (requested IP), 51 (lease), 52 (overload) and 53 (type) read;
  a wrong length for 50/51/53, an option running past the UDP payload, no END,
  or more than MAX_OPTIONS options make the message malformed;
- option 52 (overload) is never followed into sname/file: a server message that
  sets it creates no binding.

    >>> msg = build(op=2, msg_type=ACK, chaddr="02:00:00:00:00:02", yiaddr="10.0.0.2", lease=60)
    >>> info = parse(msg); (info.msg_type, info.yiaddr, info.lease)
    (5, '10.0.0.2', 60)
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from xfer.dhcp.model import mac_bytes, mac_text

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MAGIC = b"\x63\x82\x53\x63"
FIXED = 236
MAX_OPTIONS = 64
OPT_REQUESTED, OPT_LEASE, OPT_OVERLOAD, OPT_TYPE, OPT_SERVER = 50, 51, 52, 53, 54


class Malformed(ValueError):
    """The message breaks one of the parsing rules (see the module docstring)."""


@dataclass(frozen=True)
class DhcpInfo:
    op: int
    msg_type: int | None
    chaddr: str
    ciaddr: str
    yiaddr: str
    lease: int | None
    requested: str | None
    overload: bool


def _ip(text: str | None) -> bytes:
    return ipaddress.IPv4Address(text or "0.0.0.0").packed


def build(op: int, msg_type: int | None, chaddr: str, *, xid: int = 0x1234,
          ciaddr: str | None = None, yiaddr: str | None = None, lease: int | None = None,
          requested: str | None = None, server: str | None = None,
          extra: Sequence[tuple[int, bytes]] = (), end: bool = True) -> bytes:
    """A BOOTP/DHCP message (UDP payload), options in the order given."""
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, xid, 0, 0x8000,
                       _ip(ciaddr), _ip(yiaddr), b"\0" * 4, b"\0" * 4,
                       mac_bytes(chaddr), b"", b"")
    opts = bytearray(MAGIC)
    if msg_type is not None:
        opts += bytes([OPT_TYPE, 1, msg_type])
    if server:
        opts += bytes([OPT_SERVER, 4]) + _ip(server)
    if lease is not None:
        opts += bytes([OPT_LEASE, 4]) + struct.pack("!I", lease)
    if requested:
        opts += bytes([OPT_REQUESTED, 4]) + _ip(requested)
    for code, value in extra:
        opts += bytes([code, len(value)]) + value
    if end:
        opts.append(255)
    return head + bytes(opts)


def parse(payload: bytes) -> DhcpInfo:
    """Parse a UDP payload by the datapath's rules; Malformed when it breaks one."""
    end = len(payload)
    if end < FIXED + 4:
        raise Malformed("shorter than the fixed header and magic cookie")
    op, htype, hlen = payload[0], payload[1], payload[2]
    if htype != 1 or hlen != 6:
        raise Malformed("not Ethernet (htype 1, hlen 6)")
    if payload[FIXED:FIXED + 4] != MAGIC:
        raise Malformed("no magic cookie")
    ciaddr, yiaddr = payload[12:16], payload[16:20]
    msg_type = lease = None
    requested = None
    overload = False
    pos = FIXED + 4
    for _ in range(MAX_OPTIONS):
        if pos >= end:
            raise Malformed("options end without END")
        code = payload[pos]
        if code == 0:
            pos += 1
            continue
        if code == 255:
            return DhcpInfo(op, msg_type, mac_text(payload[28:34]),
                            str(ipaddress.IPv4Address(ciaddr)), str(ipaddress.IPv4Address(yiaddr)),
                            lease, requested, overload)
        if pos + 2 > end:
            raise Malformed(f"option {code} has no length")
        length = payload[pos + 1]
        if pos + 2 + length > end:
            raise Malformed(f"option {code} runs past the message")
        value = payload[pos + 2:pos + 2 + length]
        if code == OPT_TYPE:
            if length != 1:
                raise Malformed("option 53 length is not 1")
            msg_type = value[0]
        elif code == OPT_LEASE:
            if length != 4:
                raise Malformed("option 51 length is not 4")
            lease = struct.unpack("!I", value)[0]
        elif code == OPT_REQUESTED:
            if length != 4:
                raise Malformed("option 50 length is not 4")
            requested = str(ipaddress.IPv4Address(value))
        elif code == OPT_OVERLOAD:
            overload = True
        pos += 2 + length
    raise Malformed(f"more than {MAX_OPTIONS} options")


def creates_binding(payload: bytes) -> bool:
    """Would this server message, arriving on a trusted port, create a binding?"""
    try:
        d = parse(payload)
    except Malformed:
        return False
    return (d.op == 2 and not d.overload and d.msg_type == ACK and d.lease is not None
            and d.yiaddr != "0.0.0.0")


# --- frames -------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes,
             udp_len: int | None = None) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0: optional for IPv4); ``udp_len`` may lie."""
    ulen = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, ulen if udp_len is None else udp_len, 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                      _ip(src), _ip(dst))
    hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
    return hdr + udp


def ethernet(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    """An Ethernet/IPv4 ARP body (request op 1, reply op 2)."""
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac_bytes(sha), _ip(spa),
                       mac_bytes(tha), _ip(tpa))


BROADCAST = "ff:ff:ff:ff:ff:ff"


def vlan_tag(frame: bytes, vid: int, pcp: int = 0) -> bytes:
    """Insert an 802.1Q tag after the MAC addresses of an Ethernet frame."""
    return frame[:12] + struct.pack("!HH", 0x8100, (pcp << 13) | (vid & 0x0FFF)) + frame[12:]
