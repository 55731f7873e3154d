"""Parsing link events for the port follower (pure: no root, no netlink)."""

from __future__ import annotations

import struct

from xfer.dhcp.follow import IFLA_IFNAME, RTM_DELLINK, RTM_NEWLINK, LinkEvent, parse_link_events


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _msg(kind: int, index: int, name: str | None, extra: bytes = b"") -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, 0, 0) + extra
    if name is not None:
        body += _attr(IFLA_IFNAME, name.encode() + b"\0")
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_new_and_deleted_links_with_their_names() -> None:
    data = (_msg(RTM_NEWLINK, 7, "tap-vm1", extra=_attr(4, b"\x00\x05\x00\x00"))
            + _msg(24, 1, None)                       # an address message: skipped
            + _msg(RTM_DELLINK, 7, "tap-vm1"))
    assert list(parse_link_events(data)) == [LinkEvent(RTM_NEWLINK, 7, "tap-vm1"),
                                             LinkEvent(RTM_DELLINK, 7, "tap-vm1")]


def test_truncated_or_lying_messages_stop_the_parse() -> None:
    whole = _msg(RTM_NEWLINK, 3, "tap0")
    assert list(parse_link_events(whole[:-3])) == []
    lying = struct.pack("=IHHII", 4, RTM_NEWLINK, 0, 0, 0) + whole[16:]   # length below the header
    assert list(parse_link_events(lying)) == []
    bad_attr = _msg(RTM_NEWLINK, 3, None, extra=struct.pack("=HH", 200, IFLA_IFNAME) + b"tap0")
    assert list(parse_link_events(bad_attr)) == [LinkEvent(RTM_NEWLINK, 3, None)]
