"""The ECP/VDP frame codec: real lldpad frames, every refusal, and a structure-aware fuzz test."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xfer.errors import FrameError
from xfer.vdp import frame as f

# Captured on a veth between lldpad 1.1 (station, vdptool hints=from) and lldpad in bridge role.
LLDPAD_REQUEST = bytes.fromhex(
    "0180c2000000ee684f162b228940100100030a10626c61646535000000000000000000000621201234560305"
    "a1b2c3d4000040008000000000000002020001525400aabb020000")
LLDPAD_RESPONSE = bytes.fromhex(
    "0180c200000026f06833f06a8940100100030a10626c61646535000000000000000000000621401234560305"
    "a1b2c3d4000040008000000000000002020001525400aabb020000")
LLDPAD_ACK = bytes.fromhex("0180c2000000ee684f162b22894014010003")
BRIDGE_MAC = bytes.fromhex("26f06833f06a")


def test_decodes_lldpad_request() -> None:
    got = f.decode(LLDPAD_REQUEST)
    assert got.src == bytes.fromhex("ee684f162b22") and got.dst == f.NEAREST_BRIDGE
    assert (got.frame.op, got.frame.seq) == (f.Op.REQUEST, 3)
    (vsi,) = got.frame.vsis
    assert vsi.mode == f.Mode.ASSOC and vsi.suspended and not vsi.migrating_in
    assert vsi.manager_id.rstrip(b"\0") == b"blade5"
    assert (vsi.type_id, vsi.type_version) == (1193046, 3)
    assert vsi.uuid == "a1b2c3d4-0000-4000-8000-000000000002"
    assert vsi.macs == ("52:54:00:aa:bb:02",) and vsi.entries[0].vid == 0


def test_response_is_byte_for_byte_what_lldpad_bridge_sends() -> None:
    vsi = f.decode(LLDPAD_REQUEST).frame.vsis[0]
    ours = f.encode(f.NEAREST_BRIDGE, BRIDGE_MAC, f.EcpFrame(f.Op.REQUEST, 3, (vsi.response(f.VdpError.OK),)))
    assert ours == LLDPAD_RESPONSE


def test_ack_and_padding() -> None:
    assert f.decode(LLDPAD_ACK).frame == f.EcpFrame(f.Op.ACK, 3)
    # A real NIC pads short frames to 60 bytes with zeros: still the same ACK / request.
    assert f.decode(LLDPAD_ACK.ljust(60, b"\0")).frame == f.EcpFrame(f.Op.ACK, 3)
    assert f.decode(LLDPAD_REQUEST + bytes(5)).frame == f.decode(LLDPAD_REQUEST).frame


def test_error_status_bits() -> None:
    vsi = f.decode(LLDPAD_REQUEST).frame.vsis[0]
    assert vsi.response(f.VdpError.OTHER, hard=True).status == 0x54
    assert vsi.response(f.VdpError.NO_MANAGER).status == 0x43


def _with(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value):]


VSI_AT = 14 + 4 + 18          # Ethernet, ECP, Manager ID TLV (2 + 16)


@pytest.mark.parametrize(("raw", "reason"), [
    (LLDPAD_REQUEST[:17], "truncated"),
    (LLDPAD_REQUEST[:-1], "truncated"),
    (LLDPAD_REQUEST[:VSI_AT + 1], "truncated"),
    (LLDPAD_REQUEST + bytes(1600), "oversized"),
    (_with(LLDPAD_REQUEST, 12, b"\x08\x00"), "not-ecp"),
    (_with(LLDPAD_REQUEST, 0, bytes.fromhex("01005e000001")), "bad-destination"),
    (_with(LLDPAD_REQUEST, 6, bytes.fromhex("ffffffffffff")), "bad-source"),
    (_with(LLDPAD_REQUEST, 6, bytes(6)), "bad-source"),
    (_with(LLDPAD_REQUEST, 14, b"\x20\x01"), "bad-version"),
    (_with(LLDPAD_REQUEST, 14, b"\x10\x02"), "not-vdp"),
    (_with(LLDPAD_REQUEST, 14, b"\x18\x01"), "bad-op"),
    (LLDPAD_ACK + b"\x01", "bad-ack"),
    (_with(LLDPAD_REQUEST, 18, b"\x0a\x0f"), "bad-length"),           # Manager ID of 15 bytes
    (_with(LLDPAD_REQUEST, VSI_AT, b"\x06\x20"), "bad-length"),       # VSI TLV one byte short
    (_with(LLDPAD_REQUEST, VSI_AT + 2, b"\x60"), "bad-status"),       # response bit in a request
    (_with(LLDPAD_REQUEST, VSI_AT + 7, b"\x09"), "bad-vsi-format"),
    (_with(LLDPAD_REQUEST, VSI_AT + 24, b"\x07"), "bad-filter-format"),
    (_with(LLDPAD_REQUEST, VSI_AT + 25, b"\x00\x00"), "bad-filter"),
    (_with(LLDPAD_REQUEST, VSI_AT + 25, b"\x00\x02"), "bad-length"),  # count says 2, one entry
    (_with(LLDPAD_REQUEST, VSI_AT, b"\x10\x21"), "unknown-tlv"),      # type 8
    (LLDPAD_REQUEST[:18] + LLDPAD_REQUEST[VSI_AT:], "no-manager-id"),
    (LLDPAD_REQUEST[:VSI_AT], "no-vsi"),
    (LLDPAD_REQUEST + b"\x00\x00\x01", "bad-tlv"),                    # data after End
])
def test_refusals(raw: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        f.decode(raw)
    assert info.value.reason == reason


def test_org_specific_tlv_is_skipped_and_unknown_formats_round_trip() -> None:
    org = struct.pack("!H", (127 << 9) | 4) + b"\x00\x80\xc2\x99"
    got = f.decode(LLDPAD_REQUEST + org)
    assert len(got.frame.vsis) == 1


# --- structure-aware fuzzing ---------------------------------------------------------------

macs = st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] & 0xFE]) + b[1:]).filter(any)


@st.composite
def vsis(draw: st.DrawFn) -> f.VsiTlv:
    fmt = draw(st.sampled_from(sorted(f.FILTER_ENTRY_SIZE)))
    entries = draw(st.lists(st.builds(
        f.FilterEntry, vid=st.integers(0, 0xFFF), pcp=st.integers(0, 7), ps=st.booleans(),
        mac=macs if fmt in (f.FILTER_MAC_VID, f.FILTER_GROUP_MAC_VID) else st.none(),
        group=st.integers(0, 2**32 - 1) if fmt in (f.FILTER_GROUP_VID, f.FILTER_GROUP_MAC_VID)
        else st.none()), min_size=1, max_size=(0x1FF - f.VSI_FIXED) // f.FILTER_ENTRY_SIZE[fmt]))
    return f.VsiTlv(
        mode=draw(st.sampled_from(list(f.Mode))), status=draw(st.sampled_from([0, 0x10, 0x20, 0x30, 0x01])),
        type_id=draw(st.integers(0, 2**24 - 1)), type_version=draw(st.integers(0, 255)),
        id_format=draw(st.sampled_from(f.VSI_ID_FORMATS)), vsi_id=draw(st.binary(min_size=16, max_size=16)),
        filter_format=fmt, entries=tuple(entries),
        manager_id=draw(st.binary(min_size=16, max_size=16)))


requests = st.builds(lambda seq, vs: f.EcpFrame(f.Op.REQUEST, seq, tuple(vs)),
                     st.integers(0, 0xFFFF), st.lists(vsis(), min_size=1, max_size=3))
frames = st.one_of(requests, st.builds(lambda s: f.EcpFrame(f.Op.ACK, s), st.integers(0, 0xFFFF)))


def _fits(raw: bytes) -> bool:
    return len(raw) <= f.MAX_FRAME


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(frames, macs)
def test_round_trip(frame: f.EcpFrame, src: bytes) -> None:
    raw = f.encode(f.NEAREST_BRIDGE, src, frame)
    if not _fits(raw):
        with pytest.raises(FrameError):
            f.decode(raw)
        return
    got = f.decode(raw)
    assert got.frame == frame and got.src == src
    assert f.encode(got.dst, got.src, got.frame) == raw


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(requests, macs, st.data())
def test_truncation_never_passes_as_the_whole_frame(frame: f.EcpFrame, src: bytes,
                                                    data: st.DataObject) -> None:
    raw = f.encode(f.NEAREST_BRIDGE, src, frame)
    cut = data.draw(st.integers(0, len(raw) - 1))
    try:
        got = f.decode(raw[:cut])
    except FrameError:
        return
    # Cut exactly at a TLV boundary: what decodes is a strict prefix of the VSIs, never garbage.
    assert got.frame.vsis == frame.vsis[:len(got.frame.vsis)]
    assert len(got.frame.vsis) < len(frame.vsis)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(requests, macs, st.data())
def test_mutated_frames_decode_or_raise_frame_error(frame: f.EcpFrame, src: bytes,
                                                   data: st.DataObject) -> None:
    raw = bytearray(f.encode(f.NEAREST_BRIDGE, src, frame))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw += data.draw(st.binary(max_size=40))
    try:
        got = f.decode(bytes(raw))
    except FrameError as exc:
        assert exc.reason and str(exc)
        return
    # Whatever decodes is a well-formed frame: it re-encodes and decodes to itself.
    for vsi in got.frame.vsis:
        assert vsi.entries and vsi.filter_format in f.FILTER_ENTRY_SIZE
        assert vsi.id_format in f.VSI_ID_FORMATS and not vsi.status & 0xC0
    assert f.decode(f.encode(got.dst, got.src, got.frame)).frame == got.frame


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_frame_error(raw: bytes) -> None:
    # Any other exception fails the test.
    with contextlib.suppress(FrameError):
        got = f.decode(b"\x01\x80\xc2\x00\x00\x00\x02\x00\x00\x00\x00\x01\x89\x40" + raw)
        assert got.frame.op in (f.Op.ACK, f.Op.REQUEST)
