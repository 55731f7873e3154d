"""Synthetic ctnetlink entries, encoded as the kernel dumps them (for root-free tests)."""

from __future__ import annotations

import socket
import struct

from xfer.bundle import Bundle
from xfer.conntrack import constants as c
from xfer.conntrack import wire
from xfer.conntrack.model import CtTuple
from xfer.conntrack.transfer import RawEntry, encode_entries, export_section_from
from xfer.model import VmIdentity


def tcp_entry(src: str, dst: str, sport: int = 40000, dport: int = 80, *,
              reply: CtTuple | None = None, status: int = c.IPS_CONFIRMED | c.IPS_ASSURED
              | c.IPS_SEEN_REPLY, timeout: int = 300, mark: int = 0, flags: int = 0x0A,
              wscale: int = 7, extra: bytes = b"") -> RawEntry:
    """An ESTABLISHED TCP entry; ``reply`` defaults to the un-NATed inverse."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    orig = CtTuple(src, dst, c.IPPROTO_TCP, sport, dport)
    reply = reply or CtTuple(dst, src, c.IPPROTO_TCP, dport, sport)
    tcp = wire.nest(c.CTA_PROTOINFO, wire.nest(
        c.CTA_PROTOINFO_TCP,
        wire.nla(c.CTA_PROTOINFO_TCP_STATE, bytes([3])),
        wire.nla(c.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, bytes([wscale])),
        wire.nla(c.CTA_PROTOINFO_TCP_WSCALE_REPLY, bytes([wscale])),
        # NOTE: this is how dumps report them: value with a zero mask
        wire.nla(c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes([flags, 0])),
        wire.nla(c.CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes([flags, 0]))))
    blob = b"".join([
        wire.encode_tuple(c.CTA_TUPLE_ORIG, orig),
        wire.encode_tuple(c.CTA_TUPLE_REPLY, reply),
        wire.nla(c.CTA_STATUS, struct.pack(">I", status)),
        wire.nla(c.CTA_TIMEOUT, struct.pack(">I", timeout)),
        wire.nla(c.CTA_MARK, struct.pack(">I", mark)),
        wire.nla(c.CTA_ID, struct.pack(">I", 12345)),
        wire.nla(c.CTA_USE, struct.pack(">I", 1)),
        tcp,
        extra,
    ])
    return RawEntry(family, blob)


def bundle_of(vm: VmIdentity, entries: list[RawEntry], **kw: object) -> Bundle:
    section = export_section_from(entries)
    return Bundle(vm=vm, source={"device": "test"}, sections={section.kind: section}, **kw)  # type: ignore[arg-type]


__all__ = ["bundle_of", "encode_entries", "tcp_entry"]
