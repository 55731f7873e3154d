"""A classic BPF socket filter for ctnetlink event sockets: pass only our VMs' entries.

Pure code, no sockets: ``program(addresses)`` returns the instructions, ``fprog``
packs them for SO_ATTACH_FILTER (``events`` attaches it). The filter reads each
event the way the kernel wrote it, with the netlink attribute extensions
(SKF_AD_NLATTR, SKF_AD_NLATTR_NEST: "find attribute X from offset A"), the
technique libnetfilter_conntrack's ``nfct_filter`` uses, and passes an event
when the source address of its original or of its reply tuple is one of the
tracked addresses — the ownership rule of ``transfer`` (the VM is an endpoint).
Everything else (the host's other flows, often 99% of the events) is dropped in
the kernel before it is queued, so it can neither cost Python time nor fill the
receive buffer (ENOBUFS).

>>> len(program([bytes([10, 0, 0, 2])])) > 0
True
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterable
from typing import NamedTuple

from xfer.conntrack import constants as c

# linux/filter.h
BPF_LD, BPF_LDX, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x05, 0x06, 0x07
BPF_W, BPF_B = 0x00, 0x10
BPF_IMM, BPF_ABS, BPF_IND = 0x00, 0x20, 0x40
BPF_JA, BPF_JEQ = 0x00, 0x10
BPF_K = 0x00
BPF_TAX = 0x00
SKF_AD_OFF = -0x1000
SKF_AD_NLATTR = 12
SKF_AD_NLATTR_NEST = 16
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
BPF_MAXINSNS = 4096
ACCEPT = 0xFFFFFFFF
# Offset of the first attribute: nlmsghdr (16) + nfgenmsg (4).
ATTRS_AT = 20
FAMILY_AT = 16
# Compares per block, so every conditional jump to the block's accept fits in 8 bits.
_BLOCK = 200

_INSN = struct.Struct("=HBBI")


class Insn(NamedTuple):
    code: int
    jt: int
    jf: int
    k: int


class FilterTooLarge(ValueError):
    """The tracked set needs more than BPF_MAXINSNS instructions."""


def _ld_abs_byte(off: int) -> Insn:
    return Insn(BPF_LD | BPF_B | BPF_ABS, 0, 0, off)


def _ld_imm(k: int) -> Insn:
    return Insn(BPF_LD | BPF_W | BPF_IMM, 0, 0, k)


def _ldx_imm(k: int) -> Insn:
    return Insn(BPF_LDX | BPF_W | BPF_IMM, 0, 0, k)


def _ancillary(which: int) -> Insn:
    return Insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_AD_OFF + which) & 0xFFFFFFFF)


def _ld_ind(off: int) -> Insn:
    return Insn(BPF_LD | BPF_W | BPF_IND, 0, 0, off)


def _jeq(k: int, jt: int, jf: int) -> Insn:
    return Insn(BPF_JMP | BPF_JEQ | BPF_K, jt, jf, k)


def _ja(off: int) -> Insn:
    return Insn(BPF_JMP | BPF_JA, 0, 0, off)


def _ret(k: int) -> Insn:
    return Insn(BPF_RET | BPF_K, 0, 0, k)


_TAX = Insn(BPF_MISC | BPF_TAX, 0, 0, 0)


def _tuple_check(tuple_type: int, src_type: int, addrs: list[bytes]) -> list[Insn]:
    """Instructions that accept when the tuple's source address is in ``addrs`` and fall
    through to the instruction after them otherwise.

    A = offset of CTA_TUPLE_<dir> among the top-level attributes, then of its
    CTA_TUPLE_IP, then of the source address attribute; X = that offset, and the
    address words are read at X + 4 (BPF loads words in network order, the order
    the addresses are packed in).
    """
    body: list[Insn] = [_TAX]
    if len(addrs[0]) == 4:
        body.append(_ld_ind(4))
        for start in range(0, len(addrs), _BLOCK):
            block = addrs[start:start + _BLOCK]
            n = len(block)
            # compare i jumps over the n-1-i compares after it and the `ja` to the accept
            body += [_jeq(int.from_bytes(a, "big"), n - i, 0) for i, a in enumerate(block)]
            body += [_ja(1), _ret(ACCEPT)]
    else:
        for a in addrs:
            # `ld [x+4+4w]; jeq word` four times, then the accept; a mismatching word
            # jumps to the next address's block (9 instructions each)
            for w in range(4):
                body += [_ld_ind(4 + 4 * w), _jeq(int.from_bytes(a[4 * w:4 * w + 4], "big"), 0, 7 - 2 * w)]
            body.append(_ret(ACCEPT))
    lookups = [(c.CTA_TUPLE_IP, SKF_AD_NLATTR_NEST), (src_type, SKF_AD_NLATTR_NEST)]
    steps: list[list[Insn]] = [[_ld_imm(ATTRS_AT), _ldx_imm(tuple_type), _ancillary(SKF_AD_NLATTR)]]
    steps += [[_ldx_imm(kind), _ancillary(which)] for kind, which in lookups]
    out: list[Insn] = []
    # each lookup: `...; jeq #0, +0, +1; ja <past this check>` (A == 0: not found);
    # the long jump needs BPF_JA, conditional jumps only reach 255 instructions
    head_len = sum(len(s) + 2 for s in steps)
    total = head_len + len(body)
    for s in steps:
        out += s
        out.append(_jeq(0, 0, 1))
        out.append(_ja(total - len(out) - 1))
    return out + body


def program(addresses: Iterable[bytes]) -> list[Insn]:
    """The filter for the packed addresses (4 or 16 bytes each); none tracked: drop all.

    >>> [i.code for i in program([])]
    [6]
    """
    v4 = sorted({a for a in addresses if len(a) == 4})
    v6 = sorted({a for a in addresses if len(a) == 16})
    if not v4 and not v6:
        return [_ret(0)]
    parts: dict[int, list[Insn]] = {}
    if v4:
        parts[socket.AF_INET] = (_tuple_check(c.CTA_TUPLE_ORIG, c.CTA_IP_V4_SRC, v4)
                                 + _tuple_check(c.CTA_TUPLE_REPLY, c.CTA_IP_V4_SRC, v4) + [_ret(0)])
    if v6:
        parts[socket.AF_INET6] = (_tuple_check(c.CTA_TUPLE_ORIG, c.CTA_IP_V6_SRC, v6)
                                  + _tuple_check(c.CTA_TUPLE_REPLY, c.CTA_IP_V6_SRC, v6) + [_ret(0)])
    # dispatch on nfgenmsg's family: `ldb [16]; jeq AF_INET? ; jeq AF_INET6? ; ret 0`
    out = [_ld_abs_byte(FAMILY_AT)]
    families = list(parts)
    dispatch_len = 2 * len(families) + 1
    # each family: `jeq #fam, 0, 1; ja <its code>`; then `ret 0`
    at = dispatch_len + 1  # index where the first family's code starts
    starts = []
    for fam in families:
        starts.append(at)
        at += len(parts[fam])
    for j, fam in enumerate(families):
        here = len(out)
        out.append(_jeq(fam, 0, 1))
        out.append(_ja(starts[j] - (here + 1) - 1))
    out.append(_ret(0))
    for fam in families:
        out += parts[fam]
    if len(out) > BPF_MAXINSNS:
        raise FilterTooLarge(f"{len(v4)} IPv4 and {len(v6)} IPv6 addresses need {len(out)} "
                             f"BPF instructions, over the kernel's {BPF_MAXINSNS}")
    return out


class Fprog(NamedTuple):
    """A packed ``struct sock_fprog`` and the instruction buffer it points into (keep both)."""

    fprog: bytes
    buffer: ctypes.Array[ctypes.c_char]


def fprog(insns: list[Insn]) -> Fprog:
    """Pack for ``setsockopt(SOL_SOCKET, SO_ATTACH_FILTER, ...)``; keep the result alive
    until the call returns (the kernel copies the instructions)."""
    raw = b"".join(_INSN.pack(*i) for i in insns)
    buf = ctypes.create_string_buffer(raw, len(raw))
    return Fprog(struct.pack("@HL", len(insns), ctypes.addressof(buf)), buf)


def run(insns: list[Insn], packet: bytes) -> int:
    """Interpret the program over ``packet`` as the kernel would (for tests without root).

    Implements exactly the instructions ``program`` emits, the netlink extensions
    included.
    """
    a = x = 0
    pc = 0
    while True:
        i = insns[pc]
        cls = i.code & 0x07
        if i.code == BPF_RET | BPF_K:
            return i.k
        if i.code == BPF_LD | BPF_W | BPF_IMM:
            a = i.k
        elif i.code == BPF_LDX | BPF_W | BPF_IMM:
            x = i.k
        elif i.code == BPF_LD | BPF_B | BPF_ABS:
            if i.k >= len(packet):
                return 0
            a = packet[i.k]
        elif i.code == BPF_LD | BPF_W | BPF_ABS and i.k >= (SKF_AD_OFF & 0xFFFFFFFF):
            which = i.k - (SKF_AD_OFF & 0xFFFFFFFF)
            a = _nlattr(packet, a, x, nested=which == SKF_AD_NLATTR_NEST)
        elif i.code == BPF_LD | BPF_W | BPF_IND:
            off = x + i.k
            if off + 4 > len(packet):
                return 0
            a = int.from_bytes(packet[off:off + 4], "big")
        elif i.code == BPF_MISC | BPF_TAX:
            x = a
        elif i.code == BPF_JMP | BPF_JA:
            pc += i.k
        elif i.code == BPF_JMP | BPF_JEQ | BPF_K:
            pc += i.jt if a == i.k else i.jf
        else:
            raise ValueError(f"instruction {i} not supported by this interpreter (class {cls})")
        pc += 1


def _nlattr(packet: bytes, a: int, x: int, *, nested: bool) -> int:
    """The kernel's __skb_get_nlattr / __skb_get_nlattr_nest: the offset of the first
    attribute of type ``x`` from offset ``a`` (inside the attribute at ``a`` when nested),
    or 0."""
    if len(packet) < 4 or a > len(packet) - 4:
        return 0
    if nested:
        length = int.from_bytes(packet[a:a + 2], "little")
        if length > len(packet) - a:
            return 0
        start, end = a + 4, a + length
    else:
        start, end = a, len(packet)
    pos = start
    while pos + 4 <= end:
        length = int.from_bytes(packet[pos:pos + 2], "little")
        kind = int.from_bytes(packet[pos + 2:pos + 4], "little") & c.NLA_TYPE_MASK
        if length < 4 or pos + length > end:
            return 0
        if kind == x:
            return pos
        pos += (length + 3) & ~3
    return 0
