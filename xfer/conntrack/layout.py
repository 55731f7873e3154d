"""Where an import reads and patches an entry the kernel dumped, learnt once per layout.

The entries of a table nearly all share a handful of attribute layouts (same
attributes, same lengths, same order), so the offsets of the tuples' source
addresses, the status, the timeout and the TCP flags are worked out once per
layout and checked on every entry with one struct unpack of all the attribute
headers that fix them. An entry that matches is turned into a create request in
place: message header, status, timeout and TCP flags patched, every other byte
left as dumped. This is what makes an import cost under a microsecond of Python
per entry instead of a walk over its attributes (``runs`` does long runs at once).

An entry whose layout holds anything a create must not receive as dumped (NAT
bindings, helper, expectation master, security context, counters, timestamps,
an unknown attribute) has no layout and goes through ``wire.create_message``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from xfer.conntrack import constants as c
from xfer.conntrack import wire
from xfer.conntrack.stream import HDR, length_at
from xfer.conntrack.wire import CREATE_FLAGS, STATUS_DROP, TCP_FLAGS_KEEP

_HEADER = struct.Struct("=I")
_U32BE = struct.Struct(">I")
_MSG_HEAD = struct.Struct("=IHHIIBBH")

# What a create takes as dumped. The kernel's create ignores CTA_ID and CTA_USE;
# STATUS, TIMEOUT and TCP PROTOINFO are patched in place.
_AS_DUMPED = frozenset({c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY, c.CTA_STATUS, c.CTA_TIMEOUT,
                        c.CTA_PROTOINFO, c.CTA_MARK, c.CTA_ID, c.CTA_USE, c.CTA_ZONE, c.CTA_LABELS,
                        c.CTA_SEQ_ADJ_ORIG, c.CTA_SEQ_ADJ_REPLY, c.CTA_SYNPROXY})
_TCP_FIELDS = frozenset({c.CTA_PROTOINFO_TCP_STATE, c.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL,
                         c.CTA_PROTOINFO_TCP_WSCALE_REPLY, c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
                         c.CTA_PROTOINFO_TCP_FLAGS_REPLY})
_TCP_FLAGS = (c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, c.CTA_PROTOINFO_TCP_FLAGS_REPLY)
_SRC_HEADS = {_HEADER.unpack(struct.pack("=HH", 8, c.CTA_IP_V4_SRC))[0]: 4,
              _HEADER.unpack(struct.pack("=HH", 20, c.CTA_IP_V6_SRC))[0]: 16}
_DST_HEADS = {4: _HEADER.unpack(struct.pack("=HH", 8, c.CTA_IP_V4_DST))[0],
              16: _HEADER.unpack(struct.pack("=HH", 20, c.CTA_IP_V6_DST))[0]}
_TUPLE_IP = c.CTA_TUPLE_IP | c.NLA_F_NESTED


class Layout(NamedTuple):
    """Offsets (from the message start) of what an import reads and patches."""

    check: struct.Struct          # unpacks the message's length, type and family and every
    expect: tuple[int, ...]       # attribute header that fixes the offsets, and what they must read
    length: int
    step: int                     # the length rounded up to 4: where the next message starts
    words: tuple[int, ...]        # the same checks as 32-bit words (for ``runs``): offsets
    word_values: tuple[bytes, ...]  # ... and their bytes
    orig_src: int
    reply_src: int
    addr_len: int
    status: int
    timeout: int
    tcp_flags: tuple[int, ...]    # value bytes of the TCP flag attributes (none for other protocols)


def learn(payload: bytes, off: int) -> Layout | None:
    """The layout of the message at ``off``, or None when it needs the full rewrite."""
    end = off + length_at(payload, off)
    heads: list[int] = []
    found: dict[int, int] = {}
    flags: list[int] = []
    addr_len = 0
    pos = off + HDR
    try:
        for kind, start, stop in wire.iter_attrs(payload, pos, end):
            head = start - 4
            heads.append(head)
            if kind not in _AS_DUMPED or kind in found:
                return None
            found[kind] = head
            if kind in (c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY):
                # The kernel's tuple starts with CTA_TUPLE_IP holding exactly the source
                # and the destination address: all three headers are pinned, so no
                # second source can hide behind the one the ownership check reads.
                ip_head, src_head = (_HEADER.unpack_from(payload, start + i)[0] for i in (0, 4))
                n = _SRC_HEADS.get(src_head, 0)
                if (ip_head >> 16 != _TUPLE_IP or not n or addr_len not in (0, n)
                        or ip_head & 0xFFFF != 4 + 2 * (4 + n)
                        or _HEADER.unpack_from(payload, start + 8 + n)[0] != _DST_HEADS[n]):
                    return None
                addr_len = n
                heads += [start, start + 4, start + 8 + n]
            elif kind in (c.CTA_STATUS, c.CTA_TIMEOUT):
                if stop - start != 4:
                    return None
            elif kind == c.CTA_PROTOINFO:
                inner = list(wire.iter_attrs(payload, start, stop))
                if len(inner) != 1:
                    return None
                pkind, pstart, pstop = inner[0]
                heads.append(pstart - 4)
                if pkind != c.CTA_PROTOINFO_TCP:
                    continue  # SCTP, DCCP: the kernel takes its own encoding back
                for fkind, fstart, fstop in wire.iter_attrs(payload, pstart, pstop):
                    heads.append(fstart - 4)
                    if fkind not in _TCP_FIELDS:
                        return None
                    if fkind in _TCP_FLAGS:
                        if fstop - fstart != 2:
                            return None
                        flags.append(fstart)
                if len(flags) != 2:
                    return None
    except ValueError:
        return None
    if not all(k in found for k in (c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY, c.CTA_STATUS,
                                    c.CTA_TIMEOUT)):
        return None
    # the message header too: length, type and family
    rel = sorted(h - off for h in heads)
    fmt, at = ["=IH10xB3x"], HDR
    for r in rel:
        fmt.append(f"{r - at}xI" if r > at else "I")
        at = r + 4
    check = struct.Struct("".join(fmt))
    words = (0, 16, *rel)
    return Layout(check, check.unpack_from(payload, off), end - off, (end - off + 3) & ~3, words,
                  tuple(payload[off + w:off + w + 4] for w in words),
                  orig_src=found[c.CTA_TUPLE_ORIG] + 12 - off,
                  reply_src=found[c.CTA_TUPLE_REPLY] + 12 - off, addr_len=addr_len,
                  status=found[c.CTA_STATUS] + 4 - off, timeout=found[c.CTA_TIMEOUT] + 4 - off,
                  tcp_flags=tuple(f - off for f in flags))


class Layouts:
    """The layouts seen so far, by message length."""

    def __init__(self) -> None:
        self._by_length: dict[int, list[Layout]] = {}

    def of(self, payload: bytes, off: int, length: int) -> Layout | None:
        known = self._by_length.get(length)
        if known:
            for layout in known:
                if layout.check.unpack_from(payload, off) == layout.expect:
                    return layout
        if known is not None and len(known) >= 8:
            return None  # a table of odd entries: stop learning, take the slow path
        learnt = learn(payload, off)
        if learnt is not None:
            self._by_length.setdefault(length, []).append(learnt)
        return learnt


def patch(buf: bytearray, at: int, layout: Layout, length: int, family: int, seq: int,
          age: int) -> None:
    """Turn the dumped message at ``buf[at:]`` into a create request, in place."""
    _MSG_HEAD.pack_into(buf, at, length, c.MSG_CT_NEW, CREATE_FLAGS, seq, 0, family, 0, 0)
    s = at + layout.status
    # NOTE: a CTA_STATUS without IPS_CONFIRMED gets EBUSY on this kernel.
    _U32BE.pack_into(buf, s, (_U32BE.unpack_from(buf, s)[0] | c.IPS_CONFIRMED) & ~STATUS_DROP)
    t = at + layout.timeout
    _U32BE.pack_into(buf, t, max(1, _U32BE.unpack_from(buf, t)[0] - age))
    for f in layout.tcp_flags:
        # value and a full mask, BE_LIBERAL set: see wire.create_protoinfo
        buf[at + f] = (buf[at + f] & TCP_FLAGS_KEEP) | c.TCP_FLAG_BE_LIBERAL
        buf[at + f + 1] = 0xFF
