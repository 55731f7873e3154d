"""A bundle's conntrack entry read as the kernel's create will read it, or refused.

A bundle comes from another device and is hostile. The ownership check and the
kernel must agree on what an entry *is*, or a check that reads one address while
the kernel uses another opens the firewall for someone else. The kernel's parser
(``nla_parse_nested_deprecated`` in ctnetlink) is lenient in ways a checker can
disagree with:

- NOTE: of repeated attributes it keeps the *last*, at every nesting level;
- NOTE: it reads only the address attributes of the message's family (an
  ``AF_INET`` tuple's ``CTA_IP_V6_*`` are ignored) and ignores unknown types;
- NOTE: it takes a fixed-size attribute that is longer than its size, reading
  its first bytes, and ignores trailing bytes after the last attribute.

Rather than imitate each leniency, ``walk`` accepts only the unambiguous form the
kernel itself dumps: every attribute at most once at each level, only the
children a nest can hold, exact sizes, the family's own addresses, the
protocol's own fields, protocol information of the entry's own protocol. What
passes has one reading, and that reading is what ``check`` judges.

An entry is the VM's when the VM is an endpoint of every packet it lets
through: the VM is the source of the original tuple or of the reply tuple, and
each side of the reply tuple that NAT does not rewrite is the original's inverse
(without SNAT the reply goes back to the original source; without DNAT it comes
from the original destination). Without that second rule an entry
``VM -> X`` with the reply tuple ``A -> B`` would let ``A`` reach ``B``.

>>> walk(family, blob, 0, len(blob))       # doctest: +SKIP
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from xfer.conntrack import constants as c

_NLA = struct.Struct("=HH")
_U16BE = struct.Struct(">H")
_U32BE = struct.Struct(">I")


class Refused(ValueError):
    """The entry is malformed or ambiguous; ``str()`` says where."""


# --- the grammar: what each nest may hold -------------------------------------------

class Spec(NamedTuple):
    """One attribute type: exact payload size (or a maximum for binary/strings), or a nest."""

    name: str
    size: int = 0              # exact payload size; 0: see ``max_size``
    max_size: int = 0          # binary or string payload of at most this many bytes
    nest: Mapping[int, Spec] | None = None


def _fixed(name: str, size: int) -> Spec:
    return Spec(name, size=size)


def _blob(name: str, max_size: int) -> Spec:
    return Spec(name, max_size=max_size)


_V4 = {c.CTA_IP_V4_SRC: _fixed("CTA_IP_V4_SRC", 4), c.CTA_IP_V4_DST: _fixed("CTA_IP_V4_DST", 4)}
_V6 = {c.CTA_IP_V6_SRC: _fixed("CTA_IP_V6_SRC", 16), c.CTA_IP_V6_DST: _fixed("CTA_IP_V6_DST", 16)}
_PROTO = {
    c.CTA_PROTO_NUM: _fixed("CTA_PROTO_NUM", 1),
    c.CTA_PROTO_SRC_PORT: _fixed("CTA_PROTO_SRC_PORT", 2),
    c.CTA_PROTO_DST_PORT: _fixed("CTA_PROTO_DST_PORT", 2),
    c.CTA_PROTO_ICMP_ID: _fixed("CTA_PROTO_ICMP_ID", 2),
    c.CTA_PROTO_ICMP_TYPE: _fixed("CTA_PROTO_ICMP_TYPE", 1),
    c.CTA_PROTO_ICMP_CODE: _fixed("CTA_PROTO_ICMP_CODE", 1),
    c.CTA_PROTO_ICMPV6_ID: _fixed("CTA_PROTO_ICMPV6_ID", 2),
    c.CTA_PROTO_ICMPV6_TYPE: _fixed("CTA_PROTO_ICMPV6_TYPE", 1),
    c.CTA_PROTO_ICMPV6_CODE: _fixed("CTA_PROTO_ICMPV6_CODE", 1),
}
# The IP nest's grammar depends on the family; ``walk`` picks _V4 or _V6 for it.
_TUPLE = {
    c.CTA_TUPLE_IP: Spec("CTA_TUPLE_IP", nest={}),
    c.CTA_TUPLE_PROTO: Spec("CTA_TUPLE_PROTO", nest=_PROTO),
    c.CTA_TUPLE_ZONE: _fixed("CTA_TUPLE_ZONE", 2),
}
IPPROTO_DCCP, IPPROTO_GRE, IPPROTO_SCTP, IPPROTO_UDPLITE = 33, 47, 132, 136
# Protocols whose tuple carries ports (GRE's keys travel as ports too).
_PORTS = frozenset({c.IPPROTO_TCP, c.IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_SCTP, IPPROTO_DCCP,
                    IPPROTO_GRE})
_PROTO_FIELDS: dict[int, frozenset[int]] = {
    **{p: frozenset({c.CTA_PROTO_NUM, c.CTA_PROTO_SRC_PORT, c.CTA_PROTO_DST_PORT}) for p in _PORTS},
    c.IPPROTO_ICMP: frozenset({c.CTA_PROTO_NUM, c.CTA_PROTO_ICMP_ID, c.CTA_PROTO_ICMP_TYPE,
                               c.CTA_PROTO_ICMP_CODE}),
    c.IPPROTO_ICMPV6: frozenset({c.CTA_PROTO_NUM, c.CTA_PROTO_ICMPV6_ID, c.CTA_PROTO_ICMPV6_TYPE,
                                 c.CTA_PROTO_ICMPV6_CODE}),
}
_ONLY_NUM = frozenset({c.CTA_PROTO_NUM})
CTA_PROTOINFO_DCCP, CTA_PROTOINFO_SCTP = 2, 3
_TCP_INFO = {
    c.CTA_PROTOINFO_TCP_STATE: _fixed("CTA_PROTOINFO_TCP_STATE", 1),
    c.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: _fixed("CTA_PROTOINFO_TCP_WSCALE_ORIGINAL", 1),
    c.CTA_PROTOINFO_TCP_WSCALE_REPLY: _fixed("CTA_PROTOINFO_TCP_WSCALE_REPLY", 1),
    c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: _fixed("CTA_PROTOINFO_TCP_FLAGS_ORIGINAL", 2),
    c.CTA_PROTOINFO_TCP_FLAGS_REPLY: _fixed("CTA_PROTOINFO_TCP_FLAGS_REPLY", 2),
}
# DCCP (state, role, handshake seq) and SCTP (state, vtags): small fixed fields.
_DCCP_INFO = {1: _fixed("CTA_PROTOINFO_DCCP_STATE", 1), 2: _fixed("CTA_PROTOINFO_DCCP_ROLE", 1),
              3: _fixed("CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ", 8), 4: _blob("CTA_PROTOINFO_DCCP_PAD", 8)}
_SCTP_INFO = {1: _fixed("CTA_PROTOINFO_SCTP_STATE", 1),
              2: _fixed("CTA_PROTOINFO_SCTP_VTAG_ORIGINAL", 4),
              3: _fixed("CTA_PROTOINFO_SCTP_VTAG_REPLY", 4)}
_PROTOINFO = {
    c.CTA_PROTOINFO_TCP: Spec("CTA_PROTOINFO_TCP", nest=_TCP_INFO),
    CTA_PROTOINFO_DCCP: Spec("CTA_PROTOINFO_DCCP", nest=_DCCP_INFO),
    CTA_PROTOINFO_SCTP: Spec("CTA_PROTOINFO_SCTP", nest=_SCTP_INFO),
}
_INFO_PROTO = {c.CTA_PROTOINFO_TCP: c.IPPROTO_TCP, CTA_PROTOINFO_DCCP: IPPROTO_DCCP,
               CTA_PROTOINFO_SCTP: IPPROTO_SCTP}
_SEQADJ = {c.CTA_SEQADJ_CORRECTION_POS: _fixed("CTA_SEQADJ_CORRECTION_POS", 4),
           c.CTA_SEQADJ_OFFSET_BEFORE: _fixed("CTA_SEQADJ_OFFSET_BEFORE", 4),
           c.CTA_SEQADJ_OFFSET_AFTER: _fixed("CTA_SEQADJ_OFFSET_AFTER", 4)}
_COUNTERS = {c.CTA_COUNTERS_PACKETS: _fixed("CTA_COUNTERS_PACKETS", 8),
             c.CTA_COUNTERS_BYTES: _fixed("CTA_COUNTERS_BYTES", 8),
             3: _fixed("CTA_COUNTERS32_PACKETS", 4), 4: _fixed("CTA_COUNTERS32_BYTES", 4),
             5: _blob("CTA_COUNTERS_PAD", 8)}
NF_CT_HELPER_NAME_LEN = 16
_HELP = {c.CTA_HELP_NAME: _blob("CTA_HELP_NAME", NF_CT_HELPER_NAME_LEN),
         2: _blob("CTA_HELP_INFO", 256)}
_TIMESTAMP = {1: _fixed("CTA_TIMESTAMP_START", 8), 2: _fixed("CTA_TIMESTAMP_STOP", 8),
              3: _blob("CTA_TIMESTAMP_PAD", 8)}
_SECCTX = {c.CTA_SECCTX_NAME: _blob("CTA_SECCTX_NAME", 256)}
_SYNPROXY = {1: _fixed("CTA_SYNPROXY_ISN", 4), 2: _fixed("CTA_SYNPROXY_ITS", 4),
             3: _fixed("CTA_SYNPROXY_TSOFF", 4)}
NF_CT_LABELS_MAX_SIZE = 16

# Top level. What the kernel dumps; a create uses some, ignores or is not sent the rest
# (see wire.create_message and layout), but each is still read strictly. CTA_NAT_*,
# CTA_FILTER and the masks are never dumped: a bundle holding one is refused.
ENTRY: dict[int, Spec] = {
    c.CTA_TUPLE_ORIG: Spec("CTA_TUPLE_ORIG", nest=_TUPLE),
    c.CTA_TUPLE_REPLY: Spec("CTA_TUPLE_REPLY", nest=_TUPLE),
    c.CTA_TUPLE_MASTER: Spec("CTA_TUPLE_MASTER", nest=_TUPLE),
    c.CTA_STATUS: _fixed("CTA_STATUS", 4),
    c.CTA_PROTOINFO: Spec("CTA_PROTOINFO", nest=_PROTOINFO),
    c.CTA_HELP: Spec("CTA_HELP", nest=_HELP),
    c.CTA_TIMEOUT: _fixed("CTA_TIMEOUT", 4),
    c.CTA_MARK: _fixed("CTA_MARK", 4),
    c.CTA_COUNTERS_ORIG: Spec("CTA_COUNTERS_ORIG", nest=_COUNTERS),
    c.CTA_COUNTERS_REPLY: Spec("CTA_COUNTERS_REPLY", nest=_COUNTERS),
    c.CTA_USE: _fixed("CTA_USE", 4),
    c.CTA_ID: _fixed("CTA_ID", 4),
    c.CTA_SEQ_ADJ_ORIG: Spec("CTA_SEQ_ADJ_ORIG", nest=_SEQADJ),
    c.CTA_SEQ_ADJ_REPLY: Spec("CTA_SEQ_ADJ_REPLY", nest=_SEQADJ),
    c.CTA_SECMARK: _fixed("CTA_SECMARK", 4),
    c.CTA_ZONE: _fixed("CTA_ZONE", 2),
    c.CTA_SECCTX: Spec("CTA_SECCTX", nest=_SECCTX),
    c.CTA_TIMESTAMP: Spec("CTA_TIMESTAMP", nest=_TIMESTAMP),
    c.CTA_LABELS: _blob("CTA_LABELS", NF_CT_LABELS_MAX_SIZE),
    c.CTA_SYNPROXY: Spec("CTA_SYNPROXY", nest=_SYNPROXY),
}
_REQUIRED = (c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY, c.CTA_STATUS, c.CTA_TIMEOUT)
_IP_NEST: dict[int, dict[int, Spec]] = {socket.AF_INET: _V4, socket.AF_INET6: _V6}
_ADDR_LEN: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 16}


# --- the walk ---------------------------------------------------------------------

class TupleAt(NamedTuple):
    """Where a tuple's fields sit (absolute offsets of payloads; -1: absent)."""

    src: int
    dst: int
    proto: int       # the CTA_PROTO_NUM payload byte
    sport: int       # ports (-1 for protocols without)
    dport: int
    icmp_id: int     # the ICMP or ICMPv6 id (-1 for other protocols)


@dataclass
class Walk:
    """An entry that passed: every attribute header walked, and where its fields are."""

    family: int
    addr_len: int
    heads: list[int] = field(default_factory=list)        # every attribute header, all levels
    top: dict[int, tuple[int, int]] = field(default_factory=dict)  # type -> payload (start, stop)
    tuples: dict[int, TupleAt] = field(default_factory=dict)       # CTA_TUPLE_ORIG/REPLY/MASTER
    tcp_flags: list[int] = field(default_factory=list)    # payloads of the two TCP flag attributes
    protoinfo: int = 0                                    # its one child's type (0: none)


def _children(buf: bytes, start: int, end: int, grammar: Mapping[int, Spec], where: str,
              heads: list[int]) -> dict[int, tuple[int, int]]:
    """The attributes of ``buf[start:end]``: each known to ``grammar``, once, of its size."""
    found: dict[int, tuple[int, int]] = {}
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise Refused(f"{where}: {end - pos} stray bytes after the last attribute")
        length, kind = _NLA.unpack_from(buf, pos)
        kind &= c.NLA_TYPE_MASK
        if length < 4 or pos + length > end:
            raise Refused(f"{where}: attribute of type {kind} has a bad length {length}")
        spec = grammar.get(kind)
        if spec is None:
            raise Refused(f"{where}: unexpected attribute type {kind}")
        if kind in found:
            raise Refused(f"{where}: {spec.name} appears twice (the kernel would read the last)")
        size = length - 4
        if spec.nest is None and (size != spec.size if spec.size else size > spec.max_size):
            raise Refused(f"{where}: {spec.name} has {size} bytes")
        heads.append(pos)
        found[kind] = (pos + 4, pos + length)
        nxt = pos + ((length + 3) & ~3)
        if nxt > end and pos + length != end:
            raise Refused(f"{where}: attribute padding runs past the end")
        pos = nxt
    return found


def _tuple(buf: bytes, start: int, end: int, family: int, where: str, heads: list[int]) -> TupleAt:
    parts = _children(buf, start, end, _TUPLE, where, heads)
    if c.CTA_TUPLE_IP not in parts or c.CTA_TUPLE_PROTO not in parts:
        raise Refused(f"{where}: needs CTA_TUPLE_IP and CTA_TUPLE_PROTO")
    ip = _children(buf, *parts[c.CTA_TUPLE_IP], _IP_NEST[family], f"{where} CTA_TUPLE_IP", heads)
    src_t, dst_t = ((c.CTA_IP_V4_SRC, c.CTA_IP_V4_DST) if family == socket.AF_INET
                    else (c.CTA_IP_V6_SRC, c.CTA_IP_V6_DST))
    if src_t not in ip or dst_t not in ip:
        raise Refused(f"{where}: needs both addresses of its family")
    proto = _children(buf, *parts[c.CTA_TUPLE_PROTO], _PROTO, f"{where} CTA_TUPLE_PROTO", heads)
    if c.CTA_PROTO_NUM not in proto:
        raise Refused(f"{where}: needs CTA_PROTO_NUM")
    num = buf[proto[c.CTA_PROTO_NUM][0]]
    if (num == c.IPPROTO_ICMP and family != socket.AF_INET) or (
            num == c.IPPROTO_ICMPV6 and family != socket.AF_INET6):
        raise Refused(f"{where}: protocol {num} in a family-{family} entry")
    want = _PROTO_FIELDS.get(num, _ONLY_NUM)
    if set(proto) != want:
        raise Refused(f"{where}: protocol {num} takes exactly "
                      + ", ".join(sorted(_PROTO[k].name for k in want)))
    sport = dport = icmp_id = -1
    if num in _PORTS:
        sport, dport = proto[c.CTA_PROTO_SRC_PORT][0], proto[c.CTA_PROTO_DST_PORT][0]
    elif num in (c.IPPROTO_ICMP, c.IPPROTO_ICMPV6):
        icmp_id = proto[c.CTA_PROTO_ICMP_ID if num == c.IPPROTO_ICMP else c.CTA_PROTO_ICMPV6_ID][0]
    return TupleAt(ip[src_t][0], ip[dst_t][0], proto[c.CTA_PROTO_NUM][0], sport, dport, icmp_id)


def walk(family: int, buf: bytes, start: int, end: int) -> Walk:
    """Read the entry attributes in ``buf[start:end]`` strictly; Refused names what is wrong."""
    if family not in _IP_NEST:
        raise Refused(f"family {family} is neither IPv4 nor IPv6")
    w = Walk(family, _ADDR_LEN[family])
    w.top = _children(buf, start, end, ENTRY, "entry", w.heads)
    for kind in _REQUIRED:
        if kind not in w.top:
            raise Refused(f"entry has no {ENTRY[kind].name}")
    for kind in (c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY, c.CTA_TUPLE_MASTER):
        if kind in w.top:
            w.tuples[kind] = _tuple(buf, *w.top[kind], family, ENTRY[kind].name, w.heads)
    orig, reply = w.tuples[c.CTA_TUPLE_ORIG], w.tuples[c.CTA_TUPLE_REPLY]
    proto = buf[orig.proto]
    if buf[reply.proto] != proto:
        raise Refused("original and reply tuples are of different protocols")
    if c.CTA_PROTOINFO in w.top:
        info = _children(buf, *w.top[c.CTA_PROTOINFO], _PROTOINFO, "CTA_PROTOINFO", w.heads)
        if len(info) != 1:
            raise Refused("CTA_PROTOINFO must hold exactly one protocol's information")
        (w.protoinfo, (s, e)), = info.items()
        if _INFO_PROTO[w.protoinfo] != proto:
            raise Refused(f"{_PROTOINFO[w.protoinfo].name} on a protocol-{proto} entry")
        fields = _children(buf, s, e, _PROTOINFO[w.protoinfo].nest or {},
                           _PROTOINFO[w.protoinfo].name, w.heads)
        if w.protoinfo == c.CTA_PROTOINFO_TCP:
            w.tcp_flags = [fields[k][0] for k in (c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
                                                  c.CTA_PROTOINFO_TCP_FLAGS_REPLY) if k in fields]
    for kind in (c.CTA_HELP, c.CTA_SEQ_ADJ_ORIG, c.CTA_SEQ_ADJ_REPLY, c.CTA_SYNPROXY,
                 c.CTA_COUNTERS_ORIG, c.CTA_COUNTERS_REPLY, c.CTA_TIMESTAMP, c.CTA_SECCTX):
        if kind in w.top:
            _children(buf, *w.top[kind], ENTRY[kind].nest or {}, ENTRY[kind].name, w.heads)
    return w


# --- judging ------------------------------------------------------------------------

def status(buf: bytes, w: Walk) -> int:
    return int(_U32BE.unpack_from(buf, w.top[c.CTA_STATUS][0])[0])


def _field(buf: bytes, at: int, size: int) -> bytes:
    return buf[at:at + size] if at >= 0 else b""


def judge(buf: bytes, w: Walk, owned: frozenset[bytes]) -> str | None:
    """Why the walked entry is not the VM's (None: it is). See the module docstring."""
    orig, reply = w.tuples[c.CTA_TUPLE_ORIG], w.tuples[c.CTA_TUPLE_REPLY]
    n = w.addr_len
    if _field(buf, orig.src, n) not in owned and _field(buf, reply.src, n) not in owned:
        return "the VM is the source of neither tuple"
    st = status(buf, w)
    # SNAT rewrites the original source's address and port (for ICMP: its id)
    if not st & c.IPS_SRC_NAT and (
            _field(buf, reply.dst, n) != _field(buf, orig.src, n)
            or _field(buf, reply.dport, 2) != _field(buf, orig.sport, 2)
            or _field(buf, reply.icmp_id, 2) != _field(buf, orig.icmp_id, 2)):
        return "the reply does not return to the original source, and the entry has no SNAT"
    if not st & c.IPS_DST_NAT and (
            _field(buf, reply.src, n) != _field(buf, orig.dst, n)
            or _field(buf, reply.sport, 2) != _field(buf, orig.dport, 2)):
        return "the reply does not come from the original destination, and the entry has no DNAT"
    return None


def check(family: int, blob: bytes, owned: frozenset[bytes]) -> str | None:
    """One entry's attributes: raise Refused when malformed or ambiguous; return why it
    is not the VM's, or None when it is.

    >>> check(AF_INET, blob, vm.packed_addresses)   # doctest: +SKIP
    """
    return judge(blob, walk(family, blob, 0, len(blob)), owned)
