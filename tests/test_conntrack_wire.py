"""What a dumped entry becomes on its way into the destination kernel."""

import struct

import pytest

from tests.ct_factory import bundle_of, tcp_entry
from xfer.conntrack import constants as c
from xfer.conntrack import wire
from xfer.conntrack.model import CtTuple
from xfer.conntrack.transfer import decode_entries, encode_entries, import_section
from xfer.errors import BundleError, ForeignEntryError
from xfer.model import parse_vm


def _attrs_of_message(msg: bytes) -> dict[int, bytes]:
    return wire.split(msg[wire.NLMSG_HDRLEN:])


def _u32(raw: bytes) -> int:
    return struct.unpack_from(">I", raw, 4)[0]


def test_create_sets_tcp_flag_masks_and_be_liberal() -> None:
    entry = tcp_entry("10.0.1.2", "10.0.9.1", flags=0x01 | 0x20)  # WINDOW_SCALE | MAXACK_SET
    msg = wire.create_message(entry.family, entry.blob, 1)
    tcp = wire.parse_tcp(_attrs_of_message(msg)[c.CTA_PROTOINFO])
    assert tcp is not None and tcp.wscale_orig == 7 and tcp.wscale_reply == 7
    assert tcp.flags_orig == c.TCP_FLAG_WINDOW_SCALE | c.TCP_FLAG_BE_LIBERAL
    # the mask byte follows the value: all bits, so the kernel applies them
    raw = _attrs_of_message(msg)[c.CTA_PROTOINFO]
    assert bytes([0x09, 0xFF]) in raw


def test_create_reduces_timeout_by_age_and_fixes_status() -> None:
    entry = tcp_entry("10.0.1.2", "10.0.9.1", timeout=300,
                      status=c.IPS_ASSURED | c.IPS_EXPECTED | c.IPS_SEEN_REPLY)
    attrs = _attrs_of_message(wire.create_message(entry.family, entry.blob, 1, age=42))
    assert _u32(attrs[c.CTA_TIMEOUT]) == 258
    status = _u32(attrs[c.CTA_STATUS])
    assert status & c.IPS_CONFIRMED and not status & c.IPS_EXPECTED and status & c.IPS_ASSURED
    assert c.CTA_ID not in attrs and c.CTA_USE not in attrs
    assert _u32(attrs[c.CTA_MARK]) == 0
    late = _attrs_of_message(wire.create_message(entry.family, entry.blob, 1, age=900))
    assert _u32(late[c.CTA_TIMEOUT]) == 1


def test_snat_entry_is_sent_un_natted_with_a_nat_range() -> None:
    nated_reply = CtTuple("10.0.9.2", "10.0.8.1", c.IPPROTO_TCP, 7100, 61000)
    entry = tcp_entry("10.0.1.2", "10.0.9.2", 40000, 7100, reply=nated_reply,
                      status=c.IPS_CONFIRMED | c.IPS_SRC_NAT | c.IPS_SRC_NAT_DONE)
    attrs = _attrs_of_message(wire.create_message(entry.family, entry.blob, 1))
    reply = wire.parse_tuple(attrs[c.CTA_TUPLE_REPLY])
    assert (reply.src, reply.dst, reply.sport, reply.dport) == ("10.0.9.2", "10.0.1.2", 7100, 40000)
    nat = attrs[c.CTA_NAT_SRC]
    assert bytes([10, 0, 8, 1]) in nat and struct.pack(">H", 61000) in nat
    update = _attrs_of_message(wire.create_message(entry.family, entry.blob, 1,
                                                   update=True))
    assert c.CTA_NAT_SRC not in update


def test_entries_roundtrip_through_section_encoding() -> None:
    entries = [tcp_entry("10.0.1.2", "10.0.9.1"), tcp_entry("fd00:1::2", "fd00:9::1")]
    assert decode_entries(encode_entries(entries), 2) == entries
    with pytest.raises(BundleError, match=r"truncated|corrupted"):
        decode_entries(encode_entries(entries)[:-3], 2)
    with pytest.raises(BundleError, match="header says 3"):
        decode_entries(encode_entries(entries), 3)


def test_parse_entry_reads_what_the_kernel_reports() -> None:
    e = wire.parse_entry(2, tcp_entry("10.0.1.2", "10.0.9.1", 1234, 80, mark=42).blob)
    assert (e.orig.src, e.orig.dport, e.reply.src, e.mark, e.state) == \
        ("10.0.1.2", 80, "10.0.9.1", 42, "ESTABLISHED")
    assert e.to_json()["orig"] == {"src": "10.0.1.2", "dst": "10.0.9.1", "proto": "tcp",
                                   "sport": 1234, "dport": 80}


def test_foreign_entries_are_refused_before_any_kernel_call() -> None:
    vm = parse_vm("10.0.1.2", {})
    mine = tcp_entry("10.0.1.2", "10.0.9.1")
    other = tcp_entry("10.0.1.99", "10.0.9.1")
    b = bundle_of(vm, [mine, other])
    # the namespace does not exist: the foreign entry must be caught first
    with pytest.raises(ForeignEntryError, match=r"10\.0\.1\.99"):
        import_section(next(iter(b.sections.values())), b, "no-such-namespace")


def test_entries_where_the_vm_answers_belong_to_it() -> None:
    vm = parse_vm("10.0.1.2", {})
    inbound = tcp_entry("10.0.9.1", "10.0.1.2", 5000, 8000)
    # DNAT: the VM answers for a public address it does not hold
    dnat = tcp_entry("10.0.9.1", "192.0.2.10", 5000, 80,
                     reply=CtTuple("10.0.1.2", "10.0.9.1", c.IPPROTO_TCP, 8080, 5000),
                     status=c.IPS_CONFIRMED | c.IPS_DST_NAT)
    b = bundle_of(vm, [inbound, dnat])
    from xfer.conntrack.transfer import _validated

    plan = _validated(next(iter(b.sections.values())), vm)
    assert len(plan.offsets) == 2 and plan.nated == 1
    # the plain entry takes the in-place path, the NATed one the full rewrite
    assert plan.layouts[0] is not None and plan.layouts[1] is None
