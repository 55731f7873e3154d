"""ctnetlink wire codec: attribute parsing and message building, no sockets.

The transfer path keeps each entry as the kernel dumped it — its family and the
raw attribute bytes — and rewrites only what must change on the way in
(timeout, status, TCP flags, NAT). That keeps the per-entry cost at a handful of
slices instead of a full decode; ``parse_entry`` does the full decode for
people and tests.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from typing import NamedTuple

from xfer.conntrack import constants as c
from xfer.conntrack.constants import align4
from xfer.conntrack.model import ConntrackEntry, CtTuple, SeqAdj, TcpInfo

_NLA = struct.Struct("=HH")
_NLMSG = c.NLMSGHDR
_NFGEN = struct.Struct("=BBH")
_U32BE = struct.Struct(">I")
_U16BE = struct.Struct(">H")
NLMSG_HDRLEN = _NLMSG.size + _NFGEN.size  # nlmsghdr + nfgenmsg

_UPDATE_FORBIDDEN = frozenset({c.CTA_NAT_SRC, c.CTA_NAT_DST, c.CTA_HELP})
# Status bits a create cannot carry: EXPECTED needs a master entry, DYING is dying.
STATUS_DROP = c.IPS_EXPECTED | c.IPS_DYING | c.IPS_TEMPLATE | c.IPS_UNTRACKED
# TCP "seen" flags that describe window state we do not carry (td_maxack, unacked
# data); keeping them would make the destination check against zeroed windows.
TCP_FLAGS_KEEP = (c.TCP_FLAG_WINDOW_SCALE | c.TCP_FLAG_SACK_PERM | c.TCP_FLAG_CLOSE_INIT
                   | c.TCP_FLAG_SIMULTANEOUS_OPEN)


def nla(kind: int, data: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = 4 + len(data)
    return _NLA.pack(length, kind) + data + b"\0" * (align4(length) - length)


def nest(kind: int, *children: bytes) -> bytes:
    return nla(kind | c.NLA_F_NESTED, b"".join(children))


def iter_attrs(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
    """Yield ``(type, payload_start, payload_end)``; malformed lengths stop the walk."""
    end = len(buf) if end is None else end
    unpack = _NLA.unpack_from
    pos = start
    while pos + 4 <= end:
        length, kind = unpack(buf, pos)
        if length < 4 or pos + length > end:
            raise ValueError(f"malformed netlink attribute at offset {pos}")
        yield kind & c.NLA_TYPE_MASK, pos + 4, pos + length
        pos += align4(length)


def split(blob: bytes) -> dict[int, bytes]:
    """Top-level attributes of an entry: type → the raw attribute (header and padding included)."""
    out: dict[int, bytes] = {}
    unpack = _NLA.unpack_from
    pos, end = 0, len(blob)
    while pos + 4 <= end:
        length, kind = unpack(blob, pos)
        if length < 4 or pos + length > end:
            raise ValueError(f"malformed netlink attribute at offset {pos}")
        nxt = pos + align4(length)
        out[kind & c.NLA_TYPE_MASK] = blob[pos:nxt]
        pos = nxt
    return out


def _children(raw: bytes) -> dict[int, bytes]:
    """Payloads of the attributes nested in raw attribute ``raw``."""
    return {k: raw[s:e] for k, s, e in iter_attrs(raw, 4)}


# --- tuples -----------------------------------------------------------------------

# How the kernel starts every tuple (ctnetlink_dump_tuples_ip puts the source
# address first): nested CTA_TUPLE_IP, then the source address attribute.
_V4_SRC_HEAD = _NLA.pack(8, c.CTA_IP_V4_SRC)
_V6_SRC_HEAD = _NLA.pack(20, c.CTA_IP_V6_SRC)
_TUPLE_IP_TYPE = c.CTA_TUPLE_IP | c.NLA_F_NESTED


def tuple_src(buf: bytes, pos: int = 0) -> bytes:
    """The packed source address of the CTA_TUPLE_* attribute at ``pos`` (b"" if absent).

    Reads the kernel's own layout (CTA_TUPLE_IP holding exactly source and
    destination) at fixed offsets, and walks the attributes otherwise, keeping the
    last source address as the kernel's parser does: a second one hidden behind
    the first must not pass an ownership check the kernel would not agree with.
    """
    ip_len, ip_type = _NLA.unpack_from(buf, pos + 4)
    if ip_type == _TUPLE_IP_TYPE:
        head = buf[pos + 8:pos + 12]
        if head == _V4_SRC_HEAD and ip_len == 20:
            return buf[pos + 12:pos + 16]
        if head == _V6_SRC_HEAD and ip_len == 44:
            return buf[pos + 12:pos + 28]
    end = pos + _NLA.unpack_from(buf, pos)[0]
    src = b""
    for kind, s, e in iter_attrs(buf, pos + 4, end):
        if kind == c.CTA_TUPLE_IP:
            for k2, s2, e2 in iter_attrs(buf, s, e):
                if k2 in (c.CTA_IP_V4_SRC, c.CTA_IP_V6_SRC):
                    src = buf[s2:e2]
    return src


def endpoint_sources(blob: bytes) -> tuple[bytes, bytes, int]:
    """Source addresses of a dumped entry's original and reply tuples, and its status.

    For the kernel's own dumps: the kernel dumps CTA_TUPLE_ORIG, CTA_TUPLE_REPLY,
    then (after CTA_ZONE when zoned) CTA_STATUS; that layout is read at known
    places, anything else the slow way. A bundle's entries are read by ``strict``.
    """
    unpack = _NLA.unpack_from
    first_len, first_type = unpack(blob, 0)
    second = align4(first_len)
    if (first_type & c.NLA_TYPE_MASK == c.CTA_TUPLE_ORIG and second + 4 <= len(blob)
            and unpack(blob, second)[1] & c.NLA_TYPE_MASK == c.CTA_TUPLE_REPLY):
        pos = second + align4(unpack(blob, second)[0])
        for _ in range(2):
            if pos + 8 > len(blob):
                break
            length, kind = unpack(blob, pos)
            if kind & c.NLA_TYPE_MASK == c.CTA_STATUS:
                return tuple_src(blob, 0), tuple_src(blob, second), _U32BE.unpack_from(blob, pos + 4)[0]
            pos += align4(max(length, 4))
    attrs = split(blob)
    return (tuple_src(attrs[c.CTA_TUPLE_ORIG]), tuple_src(attrs[c.CTA_TUPLE_REPLY]),
            entry_status(attrs))


def parse_tuple(raw: bytes) -> CtTuple:
    top = _children(raw)
    ip = {k: top[c.CTA_TUPLE_IP][s:e] for k, s, e in iter_attrs(top.get(c.CTA_TUPLE_IP, b""))}
    pr = {k: top[c.CTA_TUPLE_PROTO][s:e] for k, s, e in iter_attrs(top.get(c.CTA_TUPLE_PROTO, b""))}
    src = ip.get(c.CTA_IP_V4_SRC) or ip.get(c.CTA_IP_V6_SRC) or b""
    dst = ip.get(c.CTA_IP_V4_DST) or ip.get(c.CTA_IP_V6_DST) or b""

    def u16(key: int) -> int | None:
        v = pr.get(key)
        return _U16BE.unpack(v[:2])[0] if v else None

    def u8(key: int) -> int | None:
        v = pr.get(key)
        return v[0] if v else None

    zone = top.get(c.CTA_TUPLE_ZONE)
    return CtTuple(
        src=str(ipaddress.ip_address(src)) if src else "",
        dst=str(ipaddress.ip_address(dst)) if dst else "",
        proto=u8(c.CTA_PROTO_NUM) or 0,
        sport=u16(c.CTA_PROTO_SRC_PORT),
        dport=u16(c.CTA_PROTO_DST_PORT),
        icmp_id=u16(c.CTA_PROTO_ICMP_ID) if c.CTA_PROTO_ICMP_ID in pr else u16(c.CTA_PROTO_ICMPV6_ID),
        icmp_type=u8(c.CTA_PROTO_ICMP_TYPE) if c.CTA_PROTO_ICMP_TYPE in pr else u8(c.CTA_PROTO_ICMPV6_TYPE),
        icmp_code=u8(c.CTA_PROTO_ICMP_CODE) if c.CTA_PROTO_ICMP_CODE in pr else u8(c.CTA_PROTO_ICMPV6_CODE),
        zone=_U16BE.unpack(zone[:2])[0] if zone else None,
    )


def encode_tuple(kind: int, t: CtTuple) -> bytes:
    """Build a CTA_TUPLE_ORIG/REPLY attribute from a record."""
    src, dst = ipaddress.ip_address(t.src), ipaddress.ip_address(t.dst)
    if src.version == 4:
        ip = nest(c.CTA_TUPLE_IP, nla(c.CTA_IP_V4_SRC, src.packed), nla(c.CTA_IP_V4_DST, dst.packed))
    else:
        ip = nest(c.CTA_TUPLE_IP, nla(c.CTA_IP_V6_SRC, src.packed), nla(c.CTA_IP_V6_DST, dst.packed))
    proto = [nla(c.CTA_PROTO_NUM, bytes([t.proto]))]
    if t.proto in (c.IPPROTO_ICMP, c.IPPROTO_ICMPV6):
        v6 = t.proto == c.IPPROTO_ICMPV6
        proto += [
            nla(c.CTA_PROTO_ICMPV6_ID if v6 else c.CTA_PROTO_ICMP_ID, _U16BE.pack(t.icmp_id or 0)),
            nla(c.CTA_PROTO_ICMPV6_TYPE if v6 else c.CTA_PROTO_ICMP_TYPE, bytes([t.icmp_type or 0])),
            nla(c.CTA_PROTO_ICMPV6_CODE if v6 else c.CTA_PROTO_ICMP_CODE, bytes([t.icmp_code or 0])),
        ]
    elif t.sport is not None:
        proto += [nla(c.CTA_PROTO_SRC_PORT, _U16BE.pack(t.sport)),
                  nla(c.CTA_PROTO_DST_PORT, _U16BE.pack(t.dport or 0))]
    parts = [ip, nest(c.CTA_TUPLE_PROTO, *proto)]
    if t.zone is not None:
        parts.append(nla(c.CTA_TUPLE_ZONE, _U16BE.pack(t.zone)))
    return nest(kind, *parts)


# --- whole entries ------------------------------------------------------------------

def _seqadj(raw: bytes | None) -> SeqAdj | None:
    if not raw:
        return None
    f = {k: _U32BE.unpack(raw[s:s + 4])[0] for k, s, e in iter_attrs(raw, 4)}
    return SeqAdj(f.get(c.CTA_SEQADJ_CORRECTION_POS, 0), f.get(c.CTA_SEQADJ_OFFSET_BEFORE, 0),
                  f.get(c.CTA_SEQADJ_OFFSET_AFTER, 0))


def _counters(raw: bytes | None) -> tuple[int, int] | None:
    if not raw:
        return None
    f = {k: int.from_bytes(raw[s:e], "big") for k, s, e in iter_attrs(raw, 4)}
    return f.get(c.CTA_COUNTERS_PACKETS, 0), f.get(c.CTA_COUNTERS_BYTES, 0)


def parse_tcp(raw_protoinfo: bytes | None) -> TcpInfo | None:
    if not raw_protoinfo:
        return None
    for kind, s, e in iter_attrs(raw_protoinfo, 4):
        if kind != c.CTA_PROTOINFO_TCP:
            continue
        f = {k: raw_protoinfo[s2:e2] for k, s2, e2 in iter_attrs(raw_protoinfo, s, e)}
        wo, wr = f.get(c.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL), f.get(c.CTA_PROTOINFO_TCP_WSCALE_REPLY)
        fo, fr = f.get(c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL), f.get(c.CTA_PROTOINFO_TCP_FLAGS_REPLY)
        return TcpInfo(state=f.get(c.CTA_PROTOINFO_TCP_STATE, b"\0")[0],
                       wscale_orig=wo[0] if wo else None, wscale_reply=wr[0] if wr else None,
                       flags_orig=fo[0] if fo else 0, flags_reply=fr[0] if fr else 0)
    return None


def parse_entry(family: int, blob: bytes) -> ConntrackEntry:
    """Full decode of one entry's attributes (as dumped by the kernel)."""
    a = split(blob)

    def u32(key: int, default: int = 0) -> int:
        raw = a.get(key)
        return _U32BE.unpack_from(raw, 4)[0] if raw else default

    zone = a.get(c.CTA_ZONE)
    labels = a.get(c.CTA_LABELS)
    secctx = a.get(c.CTA_SECCTX)
    helper = a.get(c.CTA_HELP)
    return ConntrackEntry(
        family=family,
        orig=parse_tuple(a[c.CTA_TUPLE_ORIG]),
        reply=parse_tuple(a[c.CTA_TUPLE_REPLY]),
        status=u32(c.CTA_STATUS),
        timeout=u32(c.CTA_TIMEOUT),
        mark=u32(c.CTA_MARK),
        zone=_U16BE.unpack_from(zone, 4)[0] if zone else 0,
        labels=_payload(labels) if labels else None,
        secctx=_cstring(_children(secctx).get(c.CTA_SECCTX_NAME, b"")) if secctx else None,
        helper=_cstring(_children(helper).get(c.CTA_HELP_NAME, b"")) if helper else None,
        tcp=parse_tcp(a.get(c.CTA_PROTOINFO)),
        seqadj_orig=_seqadj(a.get(c.CTA_SEQ_ADJ_ORIG)),
        seqadj_reply=_seqadj(a.get(c.CTA_SEQ_ADJ_REPLY)),
        counters_orig=_counters(a.get(c.CTA_COUNTERS_ORIG)),
        counters_reply=_counters(a.get(c.CTA_COUNTERS_REPLY)),
        id=u32(c.CTA_ID) if c.CTA_ID in a else None,
    )


def _payload(raw: bytes) -> bytes:
    return raw[4:_NLA.unpack_from(raw)[0]]


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


# --- messages ------------------------------------------------------------------

def message(msg_type: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    return _NLMSG.pack(NLMSG_HDRLEN + len(body), msg_type, flags, seq, 0) + _NFGEN.pack(family, 0, 0) + body


def dump_request(family: int, seq: int, *, orig_src: bytes | None = None,
                 reply_src: bytes | None = None, zone: int | None = None,
                 mark: int | None = None, mark_mask: int = 0xFFFFFFFF) -> bytes:
    """A CT_GET dump, filtered in the kernel (CTA_FILTER) by source address of either tuple.

    The kernel ANDs the original- and reply-tuple filters, so one request matches
    on one direction only; callers send one request per direction.
    """
    v6 = family == c.AF_INET6
    src_attr = c.CTA_IP_V6_SRC if v6 else c.CTA_IP_V4_SRC
    body: list[bytes] = []
    orig_flags = c.CTA_FILTER_FLAG_IP_SRC if orig_src is not None else 0
    reply_flags = c.CTA_FILTER_FLAG_IP_SRC if reply_src is not None else 0
    if orig_flags or reply_flags or zone is not None:
        body.append(nest(c.CTA_FILTER, nla(c.CTA_FILTER_ORIG_FLAGS, struct.pack("=I", orig_flags)),
                         nla(c.CTA_FILTER_REPLY_FLAGS, struct.pack("=I", reply_flags))))
    if orig_src is not None:
        body.append(nest(c.CTA_TUPLE_ORIG, nest(c.CTA_TUPLE_IP, nla(src_attr, orig_src))))
    if reply_src is not None:
        body.append(nest(c.CTA_TUPLE_REPLY, nest(c.CTA_TUPLE_IP, nla(src_attr, reply_src))))
    if zone is not None:
        body.append(nla(c.CTA_ZONE, _U16BE.pack(zone)))
    if mark is not None:
        body += [nla(c.CTA_MARK, _U32BE.pack(mark)), nla(c.CTA_MARK_MASK, _U32BE.pack(mark_mask))]
    return message(c.MSG_CT_GET, c.NLM_F_REQUEST | c.NLM_F_DUMP, seq, family, b"".join(body))


class NatRewrite(NamedTuple):
    """What the create message needs instead of a NATed reply tuple."""

    reply: bytes        # the un-NATed CTA_TUPLE_REPLY attribute
    nat: tuple[bytes, ...]  # CTA_NAT_SRC / CTA_NAT_DST attributes


def _nat_range(kind: int, addr: str, port: int | None) -> bytes:
    packed = ipaddress.ip_address(addr).packed
    lo, hi = ((c.CTA_NAT_V4_MINIP, c.CTA_NAT_V4_MAXIP) if len(packed) == 4
              else (c.CTA_NAT_V6_MINIP, c.CTA_NAT_V6_MAXIP))
    parts = [nla(lo, packed), nla(hi, packed)]
    if port is not None:
        p = _U16BE.pack(port)
        parts.append(nest(c.CTA_NAT_PROTO, nla(c.CTA_PROTONAT_PORT_MIN, p),
                          nla(c.CTA_PROTONAT_PORT_MAX, p)))
    return nest(kind, *parts)


def nat_rewrite(attrs: dict[int, bytes], status: int) -> NatRewrite:
    """Turn a dumped NATed entry into the un-NATed reply tuple plus NAT ranges.

    NOTE: ctnetlink creates NAT bindings from CTA_NAT_SRC/DST applied to the
    un-NATed reply tuple; sending the dumped (NATed) reply tuple alone creates an
    entry without NAT and the connection dies. Each range is collapsed to the
    address and port in use.
    """
    orig = parse_tuple(attrs[c.CTA_TUPLE_ORIG])
    reply = parse_tuple(attrs[c.CTA_TUPLE_REPLY])
    icmp = orig.icmp_type is not None
    nat: list[bytes] = []
    plain = reply
    if status & c.IPS_SRC_NAT:
        if icmp:  # the ICMP id plays the port's part
            nat.append(_nat_range(c.CTA_NAT_SRC, reply.dst, reply.icmp_id))
            plain = plain._replace(dst=orig.src, icmp_id=orig.icmp_id)
        else:
            nat.append(_nat_range(c.CTA_NAT_SRC, reply.dst, reply.dport))
            plain = plain._replace(dst=orig.src, dport=orig.sport)
    if status & c.IPS_DST_NAT:
        if icmp:
            nat.append(_nat_range(c.CTA_NAT_DST, reply.src, None))
            plain = plain._replace(src=orig.dst)
        else:
            nat.append(_nat_range(c.CTA_NAT_DST, reply.src, reply.sport))
            plain = plain._replace(src=orig.dst, sport=orig.dport)
    return NatRewrite(encode_tuple(c.CTA_TUPLE_REPLY, plain), tuple(nat))


_protoinfo_cache: dict[bytes, bytes] = {}


def create_protoinfo(raw: bytes) -> bytes:
    """Rewrite a dumped CTA_PROTOINFO so the kernel applies it on create.

    NOTE: dumps report TCP flags with a zero mask and the kernel ignores flags
    whose mask is zero; copied verbatim the entry loses window scaling (applied
    only when both directions carry WINDOW_SCALE) and BE_LIBERAL, and bulk
    traffic after the move hits INVALID drops. We send value and a full mask,
    with BE_LIBERAL set so window tracking resyncs on the first packets.
    """
    cached = _protoinfo_cache.get(raw)
    if cached is not None:
        return cached
    tcp = parse_tcp(raw)
    if tcp is None:  # SCTP, DCCP: the kernel's own encoding works as is
        out = raw
    else:
        fields = [nla(c.CTA_PROTOINFO_TCP_STATE, bytes([tcp.state]))]
        if tcp.wscale_orig is not None:
            fields.append(nla(c.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, bytes([tcp.wscale_orig])))
        if tcp.wscale_reply is not None:
            fields.append(nla(c.CTA_PROTOINFO_TCP_WSCALE_REPLY, bytes([tcp.wscale_reply])))
        fo = (tcp.flags_orig & TCP_FLAGS_KEEP) | c.TCP_FLAG_BE_LIBERAL
        fr = (tcp.flags_reply & TCP_FLAGS_KEEP) | c.TCP_FLAG_BE_LIBERAL
        fields += [nla(c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes([fo, 0xFF])),
                   nla(c.CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes([fr, 0xFF]))]
        out = nest(c.CTA_PROTOINFO, nest(c.CTA_PROTOINFO_TCP, *fields))
    if len(_protoinfo_cache) < 4096:
        _protoinfo_cache[raw] = out
    return out


_STATUS_HDR = _NLA.pack(8, c.CTA_STATUS)
_TIMEOUT_HDR = _NLA.pack(8, c.CTA_TIMEOUT)


# What a create carries over verbatim; the rest is rewritten or left behind.
_COPY = frozenset({c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY, c.CTA_ZONE, c.CTA_MARK, c.CTA_LABELS,
                   c.CTA_HELP, c.CTA_SEQ_ADJ_ORIG, c.CTA_SEQ_ADJ_REPLY, c.CTA_SYNPROXY})
_COPY_UPDATE = _COPY - _UPDATE_FORBIDDEN
NAT_BITS = c.IPS_SRC_NAT | c.IPS_DST_NAT
CREATE_FLAGS = c.NLM_F_REQUEST | c.NLM_F_CREATE | c.NLM_F_EXCL


def create_message(family: int, blob: bytes, seq: int, *, age: int = 0,
                   update: bool = False) -> bytes:
    """A CT_NEW for one dumped entry: create (EXCL) or, with ``update``, change in place.

    One pass over the entry's attributes: most are copied as they are, status,
    timeout and TCP protoinfo are rewritten, runtime-only ones are dropped. ``age``
    seconds come off the remaining timeout (never below 1 s). Updates leave out
    NAT and helper, which the kernel only accepts on create.
    """
    keep = _COPY_UPDATE if update else _COPY
    unpack = _NLA.unpack_from
    parts: list[bytes] = []
    status, timeout, reply_at = 0, 120, -1
    pos, end = 0, len(blob)
    while pos + 4 <= end:
        length, kind = unpack(blob, pos)
        if length < 4:
            raise ValueError(f"malformed netlink attribute at offset {pos}")
        kind &= c.NLA_TYPE_MASK
        nxt = pos + ((length + 3) & ~3)
        if kind in keep:
            if kind == c.CTA_TUPLE_REPLY:
                reply_at = len(parts)
            parts.append(blob[pos:nxt])
        elif kind == c.CTA_STATUS:
            status = _U32BE.unpack_from(blob, pos + 4)[0]
        elif kind == c.CTA_TIMEOUT:
            timeout = _U32BE.unpack_from(blob, pos + 4)[0]
        elif kind == c.CTA_PROTOINFO:
            parts.append(create_protoinfo(blob[pos:nxt]))
        pos = nxt
    if status & NAT_BITS and not update and reply_at >= 0:
        rewrite = nat_rewrite(split(blob), status)
        parts[reply_at] = rewrite.reply
        parts.extend(rewrite.nat)
    # NOTE: a CTA_STATUS without IPS_CONFIRMED gets EBUSY on this kernel.
    parts.append(_STATUS_HDR + _U32BE.pack((status | c.IPS_CONFIRMED) & ~STATUS_DROP))
    parts.append(_TIMEOUT_HDR + _U32BE.pack(max(1, timeout - age)))
    body = b"".join(parts)
    return (_NLMSG.pack(NLMSG_HDRLEN + len(body), c.MSG_CT_NEW,
                        c.NLM_F_REQUEST if update else CREATE_FLAGS, seq, 0)
            + _NFGEN.pack(family, 0, 0) + body)


def delete_message(family: int, attrs: dict[int, bytes], seq: int, *, same_table: bool) -> bytes:
    """A CT_DELETE for one entry, by original tuple and zone.

    ``same_table``: the attributes were dumped from the table we delete from, so
    CTA_ID is sent too and a newer entry that reused the tuple is left alone.
    (An id is meaningless in another table: a rollback must not send it.)
    """
    parts = [attrs[c.CTA_TUPLE_ORIG]]
    for kind in (c.CTA_ZONE, c.CTA_ID) if same_table else (c.CTA_ZONE,):
        if kind in attrs:
            parts.append(attrs[kind])
    return message(c.MSG_CT_DELETE, c.NLM_F_REQUEST, seq, family, b"".join(parts))


def entry_status(attrs: dict[int, bytes]) -> int:
    raw = attrs.get(c.CTA_STATUS)
    return _U32BE.unpack_from(raw, 4)[0] if raw else 0
