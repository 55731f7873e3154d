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
bindings, helper, expectation master, security context, counters, timestamps),
or that ``strict`` refuses, has no layout and goes through ``wire.create_message``
(after the strict check, for a bundle's entries).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from xfer.conntrack import constants as c
from xfer.conntrack import strict
from xfer.conntrack.stream import HDR, length_at
from xfer.conntrack.wire import CREATE_FLAGS, STATUS_DROP, TCP_FLAGS_KEEP

_U32BE = struct.Struct(">I")
_MSG_HEAD = struct.Struct("=IHHIIBBH")

# What a create takes as dumped. The kernel's create ignores CTA_ID and CTA_USE;
# STATUS, TIMEOUT and TCP PROTOINFO are patched in place.
_AS_DUMPED = frozenset({c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY, c.CTA_STATUS, c.CTA_TIMEOUT,
                        c.CTA_PROTOINFO, c.CTA_MARK, c.CTA_ID, c.CTA_USE, c.CTA_ZONE, c.CTA_LABELS,
                        c.CTA_SEQ_ADJ_ORIG, c.CTA_SEQ_ADJ_REPLY, c.CTA_SYNPROXY})


class Layout(NamedTuple):
    """Offsets (from the message start) of what an import reads and patches."""

    check: struct.Struct          # unpacks the message's length, type and family and every
    expect: tuple[int, ...]       # attribute header at every level, and what they must read
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
    # (offset, offset, size) pairs that must be equal unless the entry is SNATed / DNATed:
    # the reply tuple is the original's inverse on each side NAT leaves alone (see ``strict``)
    unless_snat: tuple[tuple[int, int, int], ...]
    unless_dnat: tuple[tuple[int, int, int], ...]


def learn(payload: bytes, off: int) -> Layout | None:
    """The layout of the message at ``off``, or None when it needs the full rewrite.

    The entry is read strictly (``strict.walk``) and the layout pins every attribute
    header it walked, at every level, plus the protocol numbers: an entry that matches
    has the very structure that was checked here, so no second address can hide in it.
    """
    end = off + length_at(payload, off)
    try:
        w = strict.walk(payload[off + 16], payload, off + HDR, end)
    except strict.Refused:
        return None
    if not set(w.top) <= _AS_DUMPED:
        return None
    if w.protoinfo == c.CTA_PROTOINFO_TCP and len(w.tcp_flags) != 2:
        return None
    orig, reply = w.tuples[c.CTA_TUPLE_ORIG], w.tuples[c.CTA_TUPLE_REPLY]
    n = w.addr_len
    # the protocol numbers' words (number and zero padding) are pinned like headers
    rel = sorted(h - off for h in (*w.heads, orig.proto, reply.proto))
    fmt, at = ["=IH10xB3x"], HDR
    for r in rel:
        fmt.append(f"{r - at}xI" if r > at else "I")
        at = r + 4
    check = struct.Struct("".join(fmt))
    words = (0, 16, *rel)

    def pairs(*candidates: tuple[int, int, int]) -> tuple[tuple[int, int, int], ...]:
        return tuple((a - off, b - off, size) for a, b, size in candidates if a >= 0)

    top = w.top
    return Layout(check, check.unpack_from(payload, off), end - off, (end - off + 3) & ~3, words,
                  tuple(payload[off + w_:off + w_ + 4] for w_ in words),
                  orig_src=orig.src - off, reply_src=reply.src - off, addr_len=n,
                  status=top[c.CTA_STATUS][0] - off, timeout=top[c.CTA_TIMEOUT][0] - off,
                  tcp_flags=tuple(f - off for f in w.tcp_flags),
                  unless_snat=pairs((orig.src, reply.dst, n), (orig.sport, reply.dport, 2),
                                    (orig.icmp_id, reply.icmp_id, 2)),
                  unless_dnat=pairs((orig.dst, reply.src, n), (orig.dport, reply.sport, 2)))


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
