"""Column-wise checks and patches of same-layout runs agree with the per-entry ones."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from tests.ct_factory import bundle_of, tcp_entry
from xfer.conntrack import constants as c
from xfer.conntrack import layout, runs, stream, wire
from xfer.conntrack.model import CtTuple
from xfer.conntrack.transfer import _create_requests, _validated
from xfer.errors import BundleError, ForeignEntryError
from xfer.model import Kind, parse_vm

VM = parse_vm("10.0.1.2,fd00:1::2", {})


def _entries(n: int, seed: int = 1) -> list[stream.RawEntry]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if i == 5:  # about to expire: still created, with 1 s
            out.append(tcp_entry("10.0.1.2", "10.0.9.1", 1024 + i, 80, timeout=0))
        elif rnd.random() < 0.5:  # the VM opened it
            out.append(tcp_entry("10.0.1.2", "10.0.9.1", 1024 + i, 80, timeout=rnd.randrange(0, 9999),
                                 flags=rnd.randrange(256), mark=rnd.randrange(3)))
        else:  # the VM answers
            out.append(tcp_entry("10.0.9.1", "10.0.1.2", 1024 + i, 22, timeout=rnd.randrange(0, 9999),
                                 flags=rnd.randrange(256)))
    return out


def _messages(chunks: list[tuple[bytes | bytearray | memoryview, int]]) -> list[bytes]:
    joined = b"".join(bytes(ch) for ch, _ in chunks)
    out, pos = [], 0
    while pos + 16 <= len(joined):
        length = stream.length_at(joined, pos)
        if length == 0:
            break
        out.append(joined[pos:pos + length])
        pos += stream.align4(length)
    return out


@pytest.mark.parametrize("age", [0, 5])
def test_a_patched_run_equals_entry_by_entry_patches(age: int) -> None:
    entries = _entries(300)
    section = bundle_of(VM, entries).sections[Kind.CONNTRACK]
    plan = _validated(section, VM)
    assert all(lay is not None for lay in plan.layouts)
    by_run = _messages(list(_create_requests(plan, 1000, age)))
    one_by_one = []
    for i, off in enumerate(plan.offsets):
        length = stream.length_at(plan.payload, off)
        buf = bytearray(plan.payload[off:off + length])
        layout.patch(buf, 0, plan.layouts[i], length, plan.payload[off + 16], 1000 + i, age)  # type: ignore[arg-type]
        one_by_one.append(bytes(buf))
    assert by_run == one_by_one
    # and both say what the full rewrite says, attribute for attribute
    full = wire.create_message(entries[7].family, entries[7].blob, 1007, age=age)
    assert {k: v for k, v in _attrs(by_run[7]).items() if k in _attrs(full)} == _attrs(full)


def _attrs(msg: bytes) -> dict[int, bytes]:
    return {k: v for k, v in wire.split(msg[stream.HDR:]).items() if k not in (c.CTA_ID, c.CTA_USE)}


def test_a_run_ends_where_the_layout_changes() -> None:
    entries = _entries(50)
    entries[37] = tcp_entry("10.0.1.2", "10.0.9.1", 9, 80, extra=wire.nla(c.CTA_ZONE, b"\0\7\0\0"))
    s = stream.from_entries(entries)
    lay = layout.learn(s.payload, 0)
    assert lay is not None
    views = runs.views(s.payload)
    assert views is not None
    assert runs.run_length(views, len(s.payload), 0, lay) == 37
    assert runs.run_length(views, len(s.payload), s.offsets[38], lay) == 12
    assert runs.run_length(views, len(s.payload), s.offsets[37], lay) == 0


def test_the_first_foreign_entry_of_a_run_is_found() -> None:
    entries = _entries(200)
    s = stream.from_entries(entries)
    lay = layout.learn(s.payload, 0)
    views = runs.views(s.payload)
    assert lay is not None and views is not None
    assert runs.first_refused(s.payload, views, 0, lay, 200, VM.packed_addresses) is None
    entries[123] = tcp_entry("10.0.1.99", "10.0.9.1", 5, 80)
    entries[150] = tcp_entry("10.0.9.1", "10.0.1.98", 6, 80)
    s = stream.from_entries(entries)
    views = runs.views(s.payload)
    assert views is not None
    assert runs.first_refused(s.payload, views, 0, lay, 200, VM.packed_addresses) == 123
    with pytest.raises(ForeignEntryError, match=r"entry 123 \(10\.0\.1\.99"):
        _validated(bundle_of(VM, entries).sections[Kind.CONNTRACK], VM)


def test_nat_entries_in_a_run_take_the_full_rewrite() -> None:
    entries = _entries(60)
    entries[44] = tcp_entry("10.0.1.2", "10.0.9.1", 44, 80, status=c.IPS_CONFIRMED | c.IPS_SRC_NAT,
                            reply=CtTuple("10.0.9.1", "192.0.2.1", c.IPPROTO_TCP, 80, 61000))
    plan = _validated(bundle_of(VM, entries).sections[Kind.CONNTRACK], VM)
    assert plan.nated == 1
    assert [i for i, lay in enumerate(plan.layouts) if lay is None] == [44]


def test_a_truncated_run_is_refused() -> None:
    section = bundle_of(VM, _entries(40)).sections[Kind.CONNTRACK]
    cut = replace(section, payload=section.payload[:-10])
    with pytest.raises(BundleError, match=r"truncated|corrupted"):
        _validated(cut, VM)


def test_a_second_source_address_in_a_tuple_is_what_counts() -> None:
    """The kernel keeps the last of two CTA_IP_V4_SRC: so must the ownership check."""
    proto = wire.nest(c.CTA_TUPLE_PROTO, wire.nla(c.CTA_PROTO_NUM, bytes([c.IPPROTO_TCP])),
                      wire.nla(c.CTA_PROTO_SRC_PORT, b"\x9c\x40"), wire.nla(c.CTA_PROTO_DST_PORT, b"\0P"))
    ip = wire.nest(c.CTA_TUPLE_IP, wire.nla(c.CTA_IP_V4_SRC, bytes([10, 0, 1, 2])),
                   wire.nla(c.CTA_IP_V4_DST, bytes([10, 0, 9, 1])),
                   wire.nla(c.CTA_IP_V4_SRC, bytes([10, 0, 1, 99])))
    honest = tcp_entry("10.0.1.2", "10.0.9.1")
    attrs = wire.split(honest.blob)
    orig = wire.nest(c.CTA_TUPLE_ORIG, ip, proto)
    reply = wire.encode_tuple(c.CTA_TUPLE_REPLY, CtTuple("10.0.9.1", "10.0.1.99", c.IPPROTO_TCP, 80, 40000))
    blob = orig + reply + b"".join(v for k, v in attrs.items()
                                   if k not in (c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY))
    assert wire.tuple_src(orig) == bytes([10, 0, 1, 99])
    smuggled = stream.RawEntry(2, blob)
    assert layout.learn(stream.message(smuggled), 0) is None
    with pytest.raises(BundleError, match=r"entry 10 is malformed: .*CTA_IP_V4_SRC appears twice"):
        _validated(bundle_of(VM, [honest] * 10 + [smuggled]).sections[Kind.CONNTRACK], VM)


def test_a_repeated_original_tuple_is_what_counts() -> None:
    """The kernel keeps the last CTA_TUPLE_ORIG of a message: so must the ownership check."""
    honest = tcp_entry("10.0.1.2", "10.0.9.1")
    foreign = wire.encode_tuple(c.CTA_TUPLE_ORIG, CtTuple("10.0.1.99", "10.0.9.1", c.IPPROTO_TCP, 1, 80))
    smuggled = stream.RawEntry(2, honest.blob + foreign)
    with pytest.raises(BundleError, match=r"entry 3 is malformed: entry: CTA_TUPLE_ORIG appears twice"):
        _validated(bundle_of(VM, [honest] * 3 + [smuggled]).sections[Kind.CONNTRACK], VM)


def test_batches_side_by_side_leave_the_gil_switch_interval_as_it_was() -> None:
    import sys

    from xfer.conntrack.netlink import GIL_SWITCH_INTERVAL, _short_gil_switches

    before = sys.getswitchinterval()
    outer = _short_gil_switches()
    outer.__enter__()
    with _short_gil_switches():
        assert sys.getswitchinterval() == min(before, GIL_SWITCH_INTERVAL)
    assert sys.getswitchinterval() == min(before, GIL_SWITCH_INTERVAL)  # the other still runs
    outer.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_a_dump_is_filtered_to_the_vms_entries_run_by_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """_filtered (small tables, IPv6 here) keeps exactly what belongs() keeps."""
    from xfer.conntrack.transfer import _filtered, belongs

    in_runs: list[int] = []
    owned_indices = runs.owned_indices

    def counting(v: runs.Views, pos: int, lay: layout.Layout, n: int, owned: frozenset[bytes]) -> list[int]:
        in_runs.append(n)
        return owned_indices(v, pos, lay, n, owned)

    monkeypatch.setattr(runs, "owned_indices", counting)

    rnd = random.Random(7)
    entries = []
    for i in range(400):
        src = rnd.choice(["10.0.1.2", "10.0.7.7", "10.0.9.1"])
        dst = rnd.choice(["10.0.1.2", "10.0.9.1"])
        entries.append(tcp_entry(src, dst, 1000 + i, 80))
    entries[200] = tcp_entry("10.0.1.2", "10.0.9.1", 5, 80, extra=wire.nla(c.CTA_ZONE, b"\0\7\0\0"))
    dump = stream.from_entries(entries)
    got = stream.entries(_filtered(dump, VM.packed_addresses))
    assert got == [e for e in entries if belongs(e.blob, VM.packed_addresses)]
    assert 0 < len(got) < len(entries)
    assert sum(in_runs) > 300  # most of the dump was checked run by run
