"""Pre-copy building blocks without root: the event socket filter, the per-VM index and
its change log, the destination's timeout bounds."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from tests.ct_factory import tcp_entry
from xfer.conntrack import constants as c
from xfer.conntrack import sockfilter, stream, wire
from xfer.conntrack.events import Event, EventKind, classify
from xfer.conntrack.index import ConntrackIndex, CursorExpired, entry_key, merged
from xfer.conntrack.model import CtTuple
from xfer.conntrack.staging import DEFAULT_TIMEOUTS, bounded
from xfer.conntrack.stream import RawEntry
from xfer.model import parse_vm

VM = parse_vm("10.0.1.2")
OTHER = parse_vm("10.0.1.3")


def _event(kind: int, entry: RawEntry) -> Event:
    flags = c.NLM_F_CREATE | c.NLM_F_EXCL if kind == EventKind.NEW else 0
    mtype = c.MSG_CT_DELETE if kind == EventKind.DESTROY else c.MSG_CT_NEW
    return Event(kind, entry.family, wire.message(mtype, flags, 0, entry.family, entry.blob))


def _packed(*addrs: str) -> list[bytes]:
    return [ipaddress.ip_address(a).packed for a in addrs]


# --- the BPF socket filter ---------------------------------------------------------------

def _msg(entry: RawEntry) -> bytes:
    return stream.message(entry)


@pytest.mark.parametrize(("orig_src", "reply_src", "passes"), [
    ("10.0.1.2", "10.0.9.1", True),    # the VM opened it
    ("10.0.9.1", "10.0.1.2", True),    # the VM answers
    ("10.0.9.1", "10.0.9.9", False),   # someone else's
])
def test_filter_passes_entries_where_a_tracked_address_is_an_endpoint(
        orig_src: str, reply_src: str, passes: bool) -> None:
    entry = tcp_entry(orig_src, reply_src, reply=CtTuple(reply_src, orig_src, 6, 80, 40000))
    prog = sockfilter.program(_packed("10.0.1.2", "10.0.7.7"))
    assert bool(sockfilter.run(prog, _msg(entry))) is passes


def test_filter_does_not_pass_a_vm_address_that_is_only_a_nat_destination() -> None:
    # DNAT to another host: the VM's address is the original destination only
    entry = tcp_entry("10.0.9.1", "10.0.1.2", reply=CtTuple("10.0.5.5", "10.0.9.1", 6, 80, 40000))
    assert sockfilter.run(sockfilter.program(_packed("10.0.1.2")), _msg(entry)) == 0


def test_filter_handles_many_addresses_across_blocks_and_both_families() -> None:
    v4 = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(700)]
    v6 = [f"fd00::{i:x}" for i in range(1, 40)]
    prog = sockfilter.program(_packed(*v4, *v6))
    assert len(prog) <= sockfilter.BPF_MAXINSNS
    for addr in (v4[0], v4[199], v4[200], v4[401], v4[-1]):
        assert sockfilter.run(prog, _msg(tcp_entry(addr, "10.9.9.9")))
    assert not sockfilter.run(prog, _msg(tcp_entry("10.1.9.9", "10.9.9.9")))
    for addr in (v6[0], v6[17], v6[-1]):
        assert sockfilter.run(prog, _msg(tcp_entry("fd01::1", addr,
                                                   reply=CtTuple(addr, "fd01::1", 6, 80, 40000))))
    assert not sockfilter.run(prog, _msg(tcp_entry("fd01::1", "fd00::99",
                                                   reply=CtTuple("fd00::99", "fd01::1", 6, 80, 1))))


def test_filter_of_one_family_drops_the_other_and_empty_set_drops_all() -> None:
    prog = sockfilter.program(_packed("10.0.1.2"))
    assert not sockfilter.run(prog, _msg(tcp_entry("fd00::2", "fd00::9")))
    assert sockfilter.run(sockfilter.program([]), _msg(tcp_entry("10.0.1.2", "10.0.9.1"))) == 0


def test_filter_too_large_is_refused() -> None:
    with pytest.raises(sockfilter.FilterTooLarge):
        sockfilter.program(_packed(*[f"fd00::{i:x}" for i in range(1, 600)]))


def test_fprog_packs_the_instructions() -> None:
    prog = sockfilter.program(_packed("10.0.1.2"))
    packed = sockfilter.fprog(prog)
    assert struct.unpack_from("@H", packed.fprog)[0] == len(prog)
    assert len(packed.buffer.raw) == 8 * len(prog)


def test_classify_reads_type_and_flags() -> None:
    e = tcp_entry("10.0.1.2", "10.0.9.1")
    assert classify(_event(EventKind.NEW, e).message) == EventKind.NEW
    assert classify(_event(EventKind.UPDATE, e).message) == EventKind.UPDATE
    assert classify(_event(EventKind.DESTROY, e).message) == EventKind.DESTROY


# --- the index -------------------------------------------------------------------------

def _seed(*entries: RawEntry) -> stream.Stream:
    return stream.from_entries(entries)


def _ports(s: stream.Stream) -> list[int]:
    return sorted(wire.parse_entry(e.family, e.blob).orig.sport or 0 for e in stream.entries(s))


def test_index_seeds_from_a_dump_keeping_only_the_vms_entries() -> None:
    idx = ConntrackIndex()
    idx.track(VM, _seed(tcp_entry("10.0.1.2", "10.0.9.1", 1), tcp_entry("10.0.1.3", "10.0.9.1", 2),
                        tcp_entry("10.0.9.1", "10.0.1.2", 3, reply=CtTuple("10.0.1.2", "10.0.9.1", 6,
                                                                            80, 3))))
    assert _ports(idx.export(VM.id)) == [1, 3]
    # the export is the kernel's own messages: a bundle section as is
    assert stream.scan(idx.export(VM.id).payload) == idx.export(VM.id).offsets


def test_index_change_log_reports_new_updated_destroyed_since_a_cursor() -> None:
    idx = ConntrackIndex(trust_seed=True)
    a, b = tcp_entry("10.0.1.2", "10.0.9.1", 1), tcp_entry("10.0.1.2", "10.0.9.1", 2)
    idx.track(VM, _seed(a, b))
    cur = idx.cursor(VM.id)
    new = tcp_entry("10.0.1.2", "10.0.9.1", 3)
    marked = tcp_entry("10.0.1.2", "10.0.9.1", 2, mark=7)
    idx.apply([_event(EventKind.NEW, new), _event(EventKind.UPDATE, marked),
               _event(EventKind.DESTROY, a), _event(EventKind.NEW, tcp_entry("10.0.5.5", "10.0.9.1", 9))])
    ch = idx.changes(VM.id, cur)
    assert _ports(ch.upserts) == [2, 3]
    assert _ports(ch.deletes) == [1]
    marks = {wire.parse_entry(*e).orig.sport: wire.parse_entry(*e).mark for e in stream.entries(ch.upserts)}
    assert marks == {2: 7, 3: 0}
    assert idx.changes(VM.id, ch.cursor) == (stream.EMPTY, stream.EMPTY, ch.cursor)
    assert _ports(idx.export(VM.id)) == [2, 3]


def test_destroy_then_recreate_is_an_upsert_and_recreate_after_cursor_only_once() -> None:
    idx = ConntrackIndex(trust_seed=True)
    a = tcp_entry("10.0.1.2", "10.0.9.1", 1)
    idx.track(VM, _seed(a))
    cur = idx.cursor(VM.id)
    idx.apply([_event(EventKind.DESTROY, a), _event(EventKind.NEW, a), _event(EventKind.UPDATE, a)])
    ch = idx.changes(VM.id, cur)
    assert (len(ch.upserts), len(ch.deletes)) == (1, 0)


def test_update_event_carrying_only_what_changed_keeps_the_rest() -> None:
    full = tcp_entry("10.0.1.2", "10.0.9.1", 1)
    attrs = wire.split(full.blob)
    partial = RawEntry(full.family, attrs[c.CTA_TUPLE_ORIG] + attrs[c.CTA_TUPLE_REPLY]
                       + wire.nla(c.CTA_MARK, struct.pack(">I", 9)))
    out = merged(stream.message(full), _event(EventKind.UPDATE, partial).message)
    entry = wire.parse_entry(out[16], out[stream.HDR:])
    assert entry.mark == 9 and entry.tcp is not None and entry.tcp.state == 3
    assert entry_key(out) == entry_key(stream.message(full))


def test_an_entry_between_two_tracked_vms_is_in_both() -> None:
    idx = ConntrackIndex()
    both = tcp_entry("10.0.1.2", "10.0.1.3", 1)
    idx.track(VM, _seed())
    idx.track(OTHER, _seed())
    idx.apply([_event(EventKind.NEW, both)])
    assert idx.count(VM.id) == idx.count(OTHER.id) == 1
    idx.untrack(OTHER.id)
    assert sorted(idx.addresses()) == _packed("10.0.1.2")


def test_cursor_from_another_generation_or_past_trimmed_tombstones_expires() -> None:
    idx = ConntrackIndex(max_tombstones=2)
    idx.track(VM, _seed())
    old = idx.cursor(VM.id)
    with pytest.raises(CursorExpired):
        idx.changes(VM.id, "other:1")
    entries = [tcp_entry("10.0.1.2", "10.0.9.1", p) for p in range(1, 6)]
    idx.apply([_event(EventKind.NEW, e) for e in entries])
    idx.apply([_event(EventKind.DESTROY, e) for e in entries])
    with pytest.raises(CursorExpired):
        idx.changes(VM.id, old)
    assert len(idx.changes(VM.id, idx.cursor()).deletes) == 0


def test_resync_logs_every_difference_with_the_fresh_dump() -> None:
    idx = ConntrackIndex(trust_seed=True)
    a, b = tcp_entry("10.0.1.2", "10.0.9.1", 1), tcp_entry("10.0.1.2", "10.0.9.1", 2)
    idx.track(VM, _seed(a, b))
    cur = idx.cursor(VM.id)
    # lost: b destroyed, c created, a marked; the timeout alone is no change
    idx.resync(_seed(tcp_entry("10.0.1.2", "10.0.9.1", 1, mark=3, timeout=100),
                     tcp_entry("10.0.1.2", "10.0.9.1", 3)))
    ch = idx.changes(VM.id, cur)
    assert _ports(ch.upserts) == [1, 3] and _ports(ch.deletes) == [2]
    cur = ch.cursor
    idx.resync(_seed(tcp_entry("10.0.1.2", "10.0.9.1", 1, mark=3, timeout=50),
                     tcp_entry("10.0.1.2", "10.0.9.1", 3)))
    assert len(idx.changes(VM.id, cur).upserts) == 0


def test_dumped_entries_are_suspects_until_an_event_names_them() -> None:
    idx = ConntrackIndex()
    a, b = tcp_entry("10.0.1.2", "10.0.9.1", 1), tcp_entry("10.0.1.2", "10.0.9.1", 2)
    idx.track(VM, _seed(a, b))
    assert len(idx.suspects(VM.id)) == 2
    idx.apply([_event(EventKind.UPDATE, a)])
    assert [entry_key(m) for m in idx.suspects(VM.id)] == [entry_key(stream.message(b))]
    cur = idx.cursor(VM.id)
    idx.confirm(VM.id, stream.EMPTY, idx.suspects(VM.id))  # b is gone from the kernel
    assert _ports(idx.changes(VM.id, cur).deletes) == [2]
    assert ConntrackIndex(trust_seed=True).trust_seed


# --- destination timeouts ---------------------------------------------------------------

def test_bounded_sets_the_kernels_timeout_for_the_state() -> None:
    est = stream.message(tcp_entry("10.0.1.2", "10.0.9.1", timeout=12))
    out, limit = bounded(est, DEFAULT_TIMEOUTS)
    assert limit == 432000 and wire.parse_entry(out[16], out[stream.HDR:]).timeout == 432000
    assert stream.scan(out) == [0]
    assert DEFAULT_TIMEOUTS.limit(c.IPPROTO_UDP, None, 0) == 30
    assert DEFAULT_TIMEOUTS.limit(c.IPPROTO_UDP, None, c.IPS_SEEN_REPLY) == 120
    assert DEFAULT_TIMEOUTS.limit(c.IPPROTO_TCP, 7, 0) == 120


def test_event_family_matches_message() -> None:
    e = tcp_entry("fd00::2", "fd00::9")
    assert _event(EventKind.NEW, e).message[16] == socket.AF_INET6


# --- delta sections (they arrive from another device: hostile) ----------------------------

def test_delta_section_round_trip_and_hostile_headers() -> None:
    from xfer.bundle import Section
    from xfer.conntrack.delta import ENCODING, delta_section, read_delta
    from xfer.conntrack.index import Changes
    from xfer.errors import BundleError

    ups = _seed(tcp_entry("10.0.1.2", "10.0.9.1", 1), tcp_entry("10.0.1.2", "10.0.9.1", 2))
    dels = _seed(tcp_entry("10.0.1.2", "10.0.9.1", 3))
    section = delta_section(Changes(ups, dels, "g:9"), base="g:4")
    d = read_delta(section)
    assert (_ports(d.upserts), _ports(d.deletes)) == ([1, 2], [3])
    assert (d.base, d.cursor, d.whole) == ("g:4", "g:9", False)
    for meta in ({**section.meta, "upserts": 3}, {**section.meta, "deletes": -1},
                 {**section.meta, "cursor": 7}, {k: v for k, v in section.meta.items() if k != "base"}):
        with pytest.raises(BundleError):
            read_delta(Section(section.kind, ENCODING, section.count, section.payload, meta))
    with pytest.raises(BundleError):   # truncated payload
        read_delta(Section(section.kind, ENCODING, section.count, section.payload[:-8], section.meta))
    with pytest.raises(BundleError):   # a full section is not a delta
        read_delta(Section(section.kind, "ctnetlink/2", section.count, section.payload, section.meta))
