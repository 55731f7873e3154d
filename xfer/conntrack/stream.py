"""Entries as a stream of ctnetlink messages: the form the kernel dumps them in.

Each message is an nlmsghdr, an nfgenmsg (the family) and the entry's
attributes. A bundle's conntrack section is such a stream, so an export keeps
the kernel's receive buffers as they came instead of copying each entry out, and
an import patches them in place into create requests (see ``layout``).
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterable
from typing import NamedTuple

from xfer.conntrack import constants as c
from xfer.conntrack.constants import align4

HDR = 20  # nlmsghdr + nfgenmsg
_HEAD = struct.Struct("=IHHIIBBH")
_LEN_TYPE = struct.Struct("=IH")
_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class RawEntry(NamedTuple):
    """One entry as the kernel dumped it: family and attribute bytes."""

    family: int
    blob: bytes


class Stream(NamedTuple):
    """Concatenated entry messages and where each one starts."""

    payload: bytes
    offsets: list[int]

    def __len__(self) -> int:
        return len(self.offsets)


EMPTY = Stream(b"", [])


def scan(payload: bytes) -> list[int]:
    """Offsets of the messages in ``payload``; ValueError names the first bad one."""
    offsets: list[int] = []
    pos, end = 0, len(payload)
    while pos < end:
        length = message_length(payload, pos, len(offsets))
        offsets.append(pos)
        pos += align4(length)
    return offsets


def message_length(payload: bytes, pos: int, index: int) -> int:
    """The length of the entry message at ``pos`` (the ``index``-th), checked to be one."""
    if pos + HDR > len(payload):
        raise ValueError(f"truncated at entry {index}")
    length, mtype = _LEN_TYPE.unpack_from(payload, pos)
    if (length < HDR or pos + length > len(payload) or mtype != c.MSG_CT_NEW
            or payload[pos + 16] not in _FAMILIES):
        raise ValueError(f"corrupted at entry {index}")
    return int(length)


def leading(got: bytes, unit: bytes) -> int:
    """How many leading ``len(unit)``-byte elements of ``got`` equal ``unit`` (binary search)."""
    size = len(unit)
    lo, hi = 0, len(got) // size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if got[:mid * size] == unit * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


def same_length_run(words: memoryview, pos: int, length: int, end: int) -> int:
    """How many messages of ``length`` bytes follow one another from byte ``pos`` of the
    whole-word view ``words`` of a buffer ``end`` bytes long (at least one: the caller
    read the first)."""
    step = align4(length)
    n = (end - pos - length) // step + 1
    if n <= 1:
        return 1
    stride = step // 4
    col = words[pos // 4:pos // 4 + (n - 1) * stride + 1:stride].tobytes()
    want = length.to_bytes(4, sys.byteorder)
    return n if col == want * n else leading(col, want)


def length_at(payload: bytes, offset: int) -> int:
    return _LEN_TYPE.unpack_from(payload, offset)[0]


def entry_at(payload: bytes, offset: int) -> RawEntry:
    return RawEntry(payload[offset + 16], payload[offset + HDR:offset + length_at(payload, offset)])


def entries(stream: Stream) -> list[RawEntry]:
    payload = stream.payload
    return [entry_at(payload, off) for off in stream.offsets]


def message(entry: RawEntry) -> bytes:
    """An entry as a message like the kernel's dump answers (type CT_NEW, no flags)."""
    return _HEAD.pack(HDR + len(entry.blob), c.MSG_CT_NEW, 0, 0, 0, entry.family, 0, 0) + entry.blob


def from_entries(items: Iterable[RawEntry]) -> Stream:
    return from_parts([message(e) for e in items])


def select(stream: Stream, keep: list[int]) -> Stream:
    """The messages of ``stream`` starting at the offsets ``keep`` (a subset of its own)."""
    if len(keep) == len(stream.offsets):
        return stream
    payload = stream.payload
    return from_parts([payload[off:off + align4(length_at(payload, off))] for off in keep])


def from_parts(messages: list[bytes]) -> Stream:
    offsets, pos = [], 0
    for part in messages:
        offsets.append(pos)
        pos += len(part)
    return Stream(b"".join(messages), offsets)


def concat(streams: Iterable[Stream]) -> Stream:
    payloads: list[bytes] = []
    offsets: list[int] = []
    base = 0
    for s in streams:
        if not s.offsets:
            continue
        payloads.append(s.payload)
        offsets.extend(off + base for off in s.offsets)
        base += len(s.payload)
    if len(payloads) == 1:
        return Stream(payloads[0], offsets)
    return Stream(b"".join(payloads), offsets)
