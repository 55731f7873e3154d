"""802.1Qbg ECP frames carrying VDP TLVs: decoded strictly, encoded exactly.

The layout, as lldpad sends it (see docs/vdp.md)::

    Ethernet   dst 01:80:c2:00:00:00 (nearest bridge), src, ethertype 0x8940
    ECP        version(4)=1 | op(2) 0 request, 1 ack | subtype(10) 1 = VDP ; sequence(16)
    TLVs       type(7) << 9 | length(9), then the body; no End TLV, no padding
               5 Manager ID (16 bytes), first; then 1-4 VSI TLVs (pre-associate,
               pre-associate with reservation, associate, de-associate)

A VSI TLV body: status(1), VSI type ID(3), type version(1), VSI ID format(1),
VSI ID(16), filter info format(1), entry count(2), entries. Everything arriving
here is hostile: ``decode`` either returns a fully checked ``EcpFrame`` or raises
``FrameError`` whose ``reason`` is a short token for counters. Trailing zero bytes
are Ethernet padding (a real NIC pads short frames to 60 bytes), anything else
after the last TLV is refused.

    frame = decode(raw)                      # FrameError when malformed
    reply = encode(NEAREST_BRIDGE, my_mac, EcpFrame(Op.ACK, frame.seq))
"""

from __future__ import annotations

import struct
import uuid as uuid_mod
from dataclasses import dataclass, replace
from enum import IntEnum

from xfer.errors import FrameError

ETH_P_ECP = 0x8940
NEAREST_BRIDGE = bytes.fromhex("0180c2000000")
ETH_HEADER = 14
ECP_HEADER = 4
ECP_VERSION = 1
SUBTYPE_VDP = 1
# An untagged Ethernet payload is at most 1500 bytes; anything longer is not a frame we sent for.
MAX_FRAME = ETH_HEADER + 1500

TLV_MANAGER_ID = 5
TLV_ORG_SPECIFIC = 127
MANAGER_ID_LEN = 16
VSI_ID_LEN = 16
# status, type id, type version, id format, VSI ID, filter format, entry count
VSI_FIXED = 1 + 3 + 1 + 1 + VSI_ID_LEN + 1 + 2

# Request status bits.
STATUS_M = 0x10          # migrating to this port (vdptool hints=to)
STATUS_S = 0x20          # suspended, migrating from (hints=from)
# Response status bits; the low nibble is the error code.
STATUS_RESPONSE = 0x40
STATUS_KEEP = 0x20
STATUS_HARD = 0x10
_STATUS_RESERVED = 0x80

# Filter info formats and the size of one entry: VID, MAC/VID, group/VID, group/MAC/VID.
FILTER_VID, FILTER_MAC_VID, FILTER_GROUP_VID, FILTER_GROUP_MAC_VID = 1, 2, 3, 4
FILTER_ENTRY_SIZE = {FILTER_VID: 2, FILTER_MAC_VID: 8, FILTER_GROUP_VID: 6, FILTER_GROUP_MAC_VID: 12}
# VSI ID formats: IPv4, IPv6, MAC, local, UUID (the field is 16 bytes whatever the format).
VSI_ID_FORMATS = (1, 2, 3, 4, 5)
VSI_ID_UUID = 5


class Op(IntEnum):
    REQUEST = 0
    ACK = 1


class Mode(IntEnum):
    """The VSI TLV's type: what the station asks for."""

    PREASSOC = 1
    PREASSOC_RR = 2
    ASSOC = 3
    DEASSOC = 4


class VdpError(IntEnum):
    """The error code in a response's status (low nibble)."""

    OK = 0
    BAD_FORMAT = 1
    NO_RESOURCES = 2
    NO_MANAGER = 3
    OTHER = 4
    BAD_FILTER = 5


@dataclass(frozen=True)
class FilterEntry:
    """One filter info entry; ``mac`` as 6 bytes, ``group`` when the format has one.

    >>> FilterEntry(vid=0, mac=bytes(6)).vid
    0
    """

    vid: int
    pcp: int = 0
    ps: bool = False
    mac: bytes | None = None
    group: int | None = None

    @property
    def mac_text(self) -> str | None:
        return ":".join(f"{b:02x}" for b in self.mac) if self.mac is not None else None


@dataclass(frozen=True)
class VsiTlv:
    """One VSI TLV with the Manager ID that precedes it.

    >>> VsiTlv(Mode.ASSOC, STATUS_M, 0x123456, 3, 5, bytes(16), 2,
    ...        (FilterEntry(0, mac=bytes(6)),)).migrating_in
    True
    """

    mode: Mode
    status: int
    type_id: int
    type_version: int
    id_format: int
    vsi_id: bytes
    filter_format: int
    entries: tuple[FilterEntry, ...]
    manager_id: bytes = bytes(MANAGER_ID_LEN)

    @property
    def migrating_in(self) -> bool:
        return bool(self.status & STATUS_M)

    @property
    def suspended(self) -> bool:
        return bool(self.status & STATUS_S)

    @property
    def uuid(self) -> str | None:
        """The VSI ID as a UUID string when its format says it is one."""
        return str(uuid_mod.UUID(bytes=self.vsi_id)) if self.id_format == VSI_ID_UUID else None

    @property
    def vsi_text(self) -> str:
        """The VSI ID for people and logs: the UUID, else hex."""
        return self.uuid or self.vsi_id.hex()

    @property
    def macs(self) -> tuple[str, ...]:
        return tuple(e.mac_text for e in self.entries if e.mac_text is not None)

    def response(self, error: int, keep: bool = False, hard: bool = False) -> VsiTlv:
        """The bridge's answer to this request: the same TLV with a response status."""
        flags = (STATUS_KEEP if keep else 0) | (STATUS_HARD if hard else 0)
        return replace(self, status=STATUS_RESPONSE | flags | (error & 0x0F))


@dataclass(frozen=True)
class EcpFrame:
    """One ECPDU: an ACK (no TLVs) or a request carrying VSI TLVs.

    >>> EcpFrame(Op.ACK, 7).vsis
    ()
    """

    op: Op
    seq: int
    vsis: tuple[VsiTlv, ...] = ()


@dataclass(frozen=True)
class Received:
    """A decoded frame with its Ethernet addresses."""

    dst: bytes
    src: bytes
    frame: EcpFrame


def decode(raw: bytes, responses: bool = False) -> Received:
    """Check and decode one Ethernet frame; ``FrameError`` names the first defect.

    A bridge receives requests only: a VSI TLV with the response bit is refused unless
    ``responses`` (the station's view, used by tests).

    >>> decode(bytes.fromhex("0180c2000000ee684f162b22894014010003")).frame.op
    <Op.ACK: 1>
    """
    if len(raw) < ETH_HEADER + ECP_HEADER:
        raise FrameError("truncated", f"{len(raw)} bytes is shorter than the Ethernet and ECP headers")
    if len(raw) > MAX_FRAME:
        raise FrameError("oversized", f"{len(raw)} bytes")
    dst, src = bytes(raw[0:6]), bytes(raw[6:12])
    (ethertype,) = struct.unpack_from("!H", raw, 12)
    if ethertype != ETH_P_ECP:
        raise FrameError("not-ecp", f"ethertype {ethertype:#06x}")
    if dst != NEAREST_BRIDGE and dst[0] & 1:
        raise FrameError("bad-destination", f"group address {dst.hex(':')} is not the nearest bridge's")
    if src[0] & 1 or not any(src):
        raise FrameError("bad-source", f"source {src.hex(':')} is not a station address")
    word, seq = struct.unpack_from("!HH", raw, ETH_HEADER)
    version, op, subtype = word >> 12, (word >> 10) & 0x3, word & 0x3FF
    if version != ECP_VERSION:
        raise FrameError("bad-version", f"ECP version {version}")
    if subtype != SUBTYPE_VDP:
        raise FrameError("not-vdp", f"ECP subtype {subtype}")
    if op not in (Op.REQUEST, Op.ACK):
        raise FrameError("bad-op", f"ECP operation {op}")
    body = memoryview(raw)[ETH_HEADER + ECP_HEADER:]
    if op == Op.ACK:
        if any(body):
            raise FrameError("bad-ack", "an ACK carries data")
        return Received(dst, src, EcpFrame(Op.ACK, seq))
    return Received(dst, src, EcpFrame(Op.REQUEST, seq, _decode_tlvs(body, responses)))


def _decode_tlvs(body: memoryview, responses: bool) -> tuple[VsiTlv, ...]:
    vsis: list[VsiTlv] = []
    manager: bytes | None = None
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 2:
            if body[pos]:
                raise FrameError("truncated", "a TLV header is cut off")
            break
        (header,) = struct.unpack_from("!H", body, pos)
        tlv_type, length = header >> 9, header & 0x1FF
        if tlv_type == 0:
            # End TLV or padding: only zeros may follow.
            if any(body[pos:]):
                raise FrameError("bad-tlv", "data after an End TLV")
            break
        start = pos + 2
        if length > end - start:
            raise FrameError("truncated", f"TLV type {tlv_type} claims {length} bytes, {end - start} left")
        value = body[start:start + length]
        pos = start + length
        if tlv_type == TLV_MANAGER_ID:
            if length != MANAGER_ID_LEN:
                raise FrameError("bad-length", f"Manager ID TLV of {length} bytes (16 expected)")
            manager = bytes(value)
        elif tlv_type in Mode._value2member_map_:
            if manager is None:
                raise FrameError("no-manager-id", "a VSI TLV without a Manager ID TLV before it")
            vsis.append(_decode_vsi(Mode(tlv_type), value, manager, responses))
        elif tlv_type == TLV_ORG_SPECIFIC:
            if length < 3:
                raise FrameError("bad-length", "organizationally specific TLV without its OUI")
        else:
            raise FrameError("unknown-tlv", f"TLV type {tlv_type}")
    if not vsis:
        raise FrameError("no-vsi", "a request without a VSI TLV")
    return tuple(vsis)


def _decode_vsi(mode: Mode, value: memoryview, manager: bytes, responses: bool) -> VsiTlv:
    if len(value) < VSI_FIXED:
        raise FrameError("bad-length", f"VSI TLV of {len(value)} bytes (at least {VSI_FIXED})")
    status = value[0]
    if status & _STATUS_RESERVED or (status & STATUS_RESPONSE and not responses):
        raise FrameError("bad-status", f"request status {status:#04x} has response or reserved bits")
    type_id = int.from_bytes(value[1:4], "big")
    type_version, id_format = value[4], value[5]
    if id_format not in VSI_ID_FORMATS:
        raise FrameError("bad-vsi-format", f"VSI ID format {id_format}")
    vsi_id = bytes(value[6:6 + VSI_ID_LEN])
    filter_format = value[22]
    size = FILTER_ENTRY_SIZE.get(filter_format)
    if size is None:
        raise FrameError("bad-filter-format", f"filter info format {filter_format}")
    (count,) = struct.unpack_from("!H", value, 23)
    if count == 0:
        raise FrameError("bad-filter", "no filter info entry")
    if len(value) != VSI_FIXED + count * size:
        raise FrameError("bad-length", f"VSI TLV of {len(value)} bytes for {count} entries of {size}")
    entries = tuple(_decode_entry(filter_format, value[VSI_FIXED + i * size:VSI_FIXED + (i + 1) * size])
                    for i in range(count))
    return VsiTlv(mode, status, type_id, type_version, id_format, vsi_id, filter_format, entries, manager)


def _decode_entry(fmt: int, data: memoryview) -> FilterEntry:
    group = int.from_bytes(data[0:4], "big") if fmt in (FILTER_GROUP_VID, FILTER_GROUP_MAC_VID) else None
    mac_at = 4 if fmt == FILTER_GROUP_MAC_VID else 0
    mac = bytes(data[mac_at:mac_at + 6]) if fmt in (FILTER_MAC_VID, FILTER_GROUP_MAC_VID) else None
    (word,) = struct.unpack_from("!H", data, len(data) - 2)
    return FilterEntry(vid=word & 0xFFF, pcp=(word >> 12) & 0x7, ps=bool(word >> 15), mac=mac, group=group)


def encode(dst: bytes, src: bytes, frame: EcpFrame) -> bytes:
    """The Ethernet frame for ``frame``; each VSI TLV is preceded by its Manager ID TLV.

    >>> len(encode(NEAREST_BRIDGE, bytes(6), EcpFrame(Op.ACK, 1)))
    18
    """
    word = (ECP_VERSION << 12) | (int(frame.op) << 10) | SUBTYPE_VDP
    parts = [dst, src, struct.pack("!HHH", ETH_P_ECP, word, frame.seq & 0xFFFF)]
    for vsi in frame.vsis:
        parts.append(_tlv(TLV_MANAGER_ID, vsi.manager_id.ljust(MANAGER_ID_LEN, b"\0")[:MANAGER_ID_LEN]))
        parts.append(_tlv(int(vsi.mode), _encode_vsi(vsi)))
    return b"".join(parts)


def _tlv(tlv_type: int, value: bytes) -> bytes:
    if len(value) > 0x1FF:
        raise FrameError("oversized", f"TLV type {tlv_type} of {len(value)} bytes")
    return struct.pack("!H", (tlv_type << 9) | len(value)) + value


def _encode_vsi(vsi: VsiTlv) -> bytes:
    size = FILTER_ENTRY_SIZE[vsi.filter_format]
    out = bytearray(struct.pack("!B", vsi.status & 0xFF))
    out += (vsi.type_id & 0xFFFFFF).to_bytes(3, "big")
    out += struct.pack("!BB", vsi.type_version & 0xFF, vsi.id_format)
    out += vsi.vsi_id.ljust(VSI_ID_LEN, b"\0")[:VSI_ID_LEN]
    out += struct.pack("!BH", vsi.filter_format, len(vsi.entries))
    for e in vsi.entries:
        if vsi.filter_format in (FILTER_GROUP_VID, FILTER_GROUP_MAC_VID):
            out += (e.group or 0).to_bytes(4, "big")
        if vsi.filter_format in (FILTER_MAC_VID, FILTER_GROUP_MAC_VID):
            out += (e.mac or bytes(6))[:6].ljust(6, b"\0")
        out += struct.pack("!H", (int(e.ps) << 15) | ((e.pcp & 0x7) << 12) | (e.vid & 0xFFF))
    assert len(out) == VSI_FIXED + len(vsi.entries) * size
    return bytes(out)
