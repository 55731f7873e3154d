"""The reference DHCP parser: the rules the datapath applies, malformed input included."""

from __future__ import annotations

import struct

import pytest

from xfer.dhcp import packet as p

MAC = "02:00:00:00:00:02"


def ack(**kw: object) -> bytes:
    args: dict[str, object] = {"op": 2, "msg_type": p.ACK, "chaddr": MAC, "yiaddr": "10.0.0.2",
                               "lease": 60, "server": "10.0.0.1"}
    args.update(kw)
    return p.build(**args)  # type: ignore[arg-type]


def test_ack_is_parsed() -> None:
    info = p.parse(ack())
    assert (info.op, info.msg_type, info.chaddr, info.yiaddr, info.lease) == (2, 5, MAC,
                                                                              "10.0.0.2", 60)
    assert p.creates_binding(ack())


def test_client_messages() -> None:
    rel = p.parse(p.build(1, p.RELEASE, MAC, ciaddr="10.0.0.2"))
    assert (rel.msg_type, rel.ciaddr) == (p.RELEASE, "10.0.0.2")
    dec = p.parse(p.build(1, p.DECLINE, MAC, requested="10.0.0.2"))
    assert dec.requested == "10.0.0.2"


def test_pad_options_are_skipped() -> None:
    msg = ack(end=False) + b"\0\0\0\xff"
    assert p.parse(msg).msg_type == p.ACK


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: m[:200], "shorter than the fixed header"),
    (lambda m: m[:-1], "without END"),                        # END cut off
    (lambda m: m[:-4], "runs past"),                          # lease value cut short
    (lambda m: m[:240] + b"\x35", "no length"),               # option code, no length byte
    (lambda m: m[:240] + b"\x33\xff\0\0\0\x3c\xff", "runs past"),   # length far too big
    (lambda m: m[:240] + b"\x35\x02\x05\x05\xff", "53 length"),
    (lambda m: m[:240] + b"\x33\x02\0\x3c\xff", "51 length"),
    (lambda m: m[:236] + b"\0\0\0\0" + m[240:], "magic"),
    (lambda m: m[:1] + b"\x06" + m[2:], "Ethernet"),
    (lambda m: m[:240] + b"\x0c\x00" * 65 + b"\xff", "more than"),
])
def test_malformed_messages_never_bind(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    msg = mutate(ack())
    with pytest.raises(p.Malformed, match=reason):
        p.parse(msg)
    assert not p.creates_binding(msg)


def test_overload_creates_no_binding() -> None:
    msg = ack(extra=[(p.OPT_OVERLOAD, b"\x03")])
    assert p.parse(msg).overload
    assert not p.creates_binding(msg)


@pytest.mark.parametrize("kw", [{"msg_type": p.OFFER}, {"lease": None}, {"yiaddr": None},
                                {"op": 1}, {"msg_type": None}])
def test_only_acks_granting_a_lease_bind(kw: dict[str, object]) -> None:
    assert not p.creates_binding(ack(**kw))


def test_frames() -> None:
    pkt = p.ipv4_udp("0.0.0.0", "255.255.255.255", 68, 67, b"x" * 10)
    assert len(pkt) == 38 and pkt[9] == 17
    assert p._checksum(pkt[:20]) == 0           # a valid header sums to zero
    lying = p.ipv4_udp("1.1.1.1", "2.2.2.2", 1, 2, b"", udp_len=99)
    assert struct.unpack("!H", lying[24:26])[0] == 99
    frame = p.ethernet(p.BROADCAST, MAC, 0x0806, p.arp(1, MAC, "10.0.0.2", p.BROADCAST, "10.0.0.1"))
    assert len(frame) == 14 + 28


def test_vlan_tag() -> None:
    frame = p.ethernet(p.BROADCAST, MAC, 0x0800, b"payload")
    tagged = p.vlan_tag(frame, 100)
    assert tagged[12:16] == b"\x81\x00\x00\x64" and tagged[16:18] == b"\x08\x00"
    assert tagged[:12] + tagged[16:] == frame
