"""Pre-copy's kernel side: the event filter, the tracker (events, loss, silent entries),
staging on the destination. conntrack(8) fills and reads the tables as the witness."""

from __future__ import annotations

import re
import time

import pytest

from tests.ct_factory import tcp_entry
from xfer.conntrack import stream, wire
from xfer.conntrack.events import EventKind, EventListener
from xfer.conntrack.netlink import CtNetlink
from xfer.conntrack.staging import Stage, kernel_timeouts
from xfer.conntrack.tracker import Tracker
from xfer.errors import ForeignEntryError
from xfer.lab.hosts import Hosts
from xfer.model import parse_vm

VM = "10.0.1.2"
PEER = "10.0.9.1"
OTHER = "10.0.1.50"


def _insert(hosts: Hosts, ns: str, src: str, dst: str, sport: int, *extra: str) -> None:
    hosts.check(ns, ["conntrack", "-I", "-s", src, "-d", dst, "-p", "tcp", "--sport", str(sport),
                     "--dport", "80", "--state", "ESTABLISHED", "-t", "300", "-u",
                     "SEEN_REPLY,ASSURED", *extra])


def _inject(ns: str, src: str, ports: range) -> None:
    """Many entries at once through ctnetlink (fast enough to overflow a small buffer)."""
    with CtNetlink(ns) as ct:
        base = ct.reserve(len(ports))
        failed = ct.batch((base + i, wire.create_message(*tcp_entry(src, PEER, p), base + i))
                          for i, p in enumerate(ports))
    assert not failed


def _listed(hosts: Hosts, ns: str, *args: str) -> list[str]:
    """conntrack -L lines, without timeout and use count (they differ by themselves)."""
    out = hosts.check(ns, ["conntrack", "-L", *args])
    lines = []
    for line in out.splitlines():
        line = re.sub(r"^(\S+\s+\d+\s+)\d+ ", r"\1", line)
        lines.append(re.sub(r" use=\d+", "", line))
    return sorted(lines)


def _count(hosts: Hosts, ns: str, *args: str) -> int:
    return len(hosts.check(ns, ["conntrack", "-L", *args]).splitlines())


def test_kernel_filter_passes_only_the_tracked_vms_entries(hosts: Hosts) -> None:
    ns = hosts.add("src")
    with EventListener(ns) as ev:
        assert ev.receive_buffer >= 16 << 20
        assert ev.set_filter([bytes([10, 0, 1, 2])])
        _insert(hosts, ns, VM, PEER, 1000)        # the VM opened it
        _insert(hosts, ns, PEER, VM, 1001)        # the VM answers (reply source)
        _insert(hosts, ns, OTHER, PEER, 1002)     # someone else's
        hosts.check(ns, ["conntrack", "-U", "-s", OTHER, "-m", "3"])
        hosts.check(ns, ["conntrack", "-U", "-s", VM, "-m", "4"])
        hosts.check(ns, ["conntrack", "-D", "-s", OTHER])
        hosts.check(ns, ["conntrack", "-D", "-s", VM])
        got = [(e.kind, wire.parse_entry(e.family, e.message[20:]).orig.sport) for e in ev.read()]
        assert got == [(EventKind.NEW, 1000), (EventKind.NEW, 1001), (EventKind.UPDATE, 1000),
                       (EventKind.DESTROY, 1000)]
        ev.set_filter(None)
        _insert(hosts, ns, OTHER, PEER, 1003)
        assert [e.kind for e in ev.read()] == [EventKind.NEW]
    assert hosts.check(ns, ["sysctl", "-n", "net.netfilter.nf_conntrack_events"]).strip() == "1"


def test_tracker_follows_events_and_resyncs_after_a_loss(hosts: Hosts) -> None:
    ns = hosts.add("src")
    vm = parse_vm(VM)
    # a tiny buffer: a burst of events overflows it (ENOBUFS)
    with Tracker(ns, buffer=4096) as tr:
        tr.track([vm])
        cur = tr.cursor(vm.id)
        _inject(ns, VM, range(2000, 3000))
        _inject(ns, OTHER, range(2000, 2100))
        ch = tr.changes(vm.id, cur, verify=False)
        assert tr.lost >= 1 and tr.index.resyncs >= 1
        assert len(ch.upserts) == 1000 and len(ch.deletes) == 0
        assert _facts(tr.export(vm.id)) == _facts(_vm_dump(ns, vm))
        assert len(_facts(tr.export(vm.id))) == 1000


def _facts(s: stream.Stream) -> set[tuple[object, ...]]:
    """What an entry is, without what changes by itself (timeout, use count)."""
    out = set()
    for e in stream.entries(s):
        p = wire.parse_entry(*e)
        out.add((p.orig, p.reply, p.status, p.mark, p.labels, p.tcp, p.zone))
    return out


def _vm_dump(ns: str, vm: object) -> stream.Stream:
    from xfer.conntrack.transfer import export_stream
    return export_stream(vm, ns)  # type: ignore[arg-type]


def test_silent_entries_from_before_the_listener_are_reread(hosts: Hosts) -> None:
    ns = hosts.add("src")
    hosts.check(ns, ["sysctl", "-w", "net.netfilter.nf_conntrack_events=2"])
    for port in (1000, 1001, 1002):
        _insert(hosts, ns, VM, PEER, port)        # no listener: these never report
    vm = parse_vm(VM)
    with Tracker(ns) as tr:
        tr.track([vm])
        cur = tr.cursor(vm.id)
        hosts.check(ns, ["conntrack", "-D", "-s", VM, "-p", "tcp", "--sport", "1000"])
        hosts.check(ns, ["conntrack", "-U", "-s", VM, "-p", "tcp", "--sport", "1001", "-m", "9"])
        assert tr.changes(vm.id, cur, verify=False) == (stream.EMPTY, stream.EMPTY, tr.cursor(vm.id))
        ch = tr.changes(vm.id, cur)
        assert [wire.parse_entry(*e).orig.sport for e in stream.entries(ch.deletes)] == [1000]
        ups = [wire.parse_entry(*e) for e in stream.entries(ch.upserts)]
        assert [(e.orig.sport, e.mark) for e in ups] == [(1001, 9)]


def test_stage_bulk_then_delta_matches_the_source_and_abort_leaves_nothing(hosts: Hosts) -> None:
    src, dst = hosts.add("src"), hosts.add("dst")
    hosts.check(dst, ["sysctl", "-w", "net.netfilter.nf_conntrack_tcp_timeout_established=7200"])
    vm = parse_vm(VM)
    with Tracker(src) as tr:
        for port in range(1000, 1100):
            _insert(hosts, src, VM, PEER, port)
        _insert(hosts, src, PEER, VM, 999)
        _insert(hosts, src, OTHER, PEER, 1000)
        tr.track([vm])
        bulk, cur = tr.snapshot(vm.id)
        with Stage(vm, dst) as stage:
            assert stage.apply(bulk).created == 101
            for port in range(2000, 2010):
                _insert(hosts, src, VM, PEER, port)
            hosts.check(src, ["conntrack", "-D", "-s", VM, "-p", "tcp", "--sport", "1000"])
            hosts.check(src, ["conntrack", "-U", "-s", VM, "-p", "tcp", "--sport", "1001", "-m", "5"])
            ch = tr.changes(vm.id, cur)
            report = stage.apply(ch.upserts, ch.deletes, final=True)
            assert (report.created, report.updated, report.deleted) == (10, 1, 1)
            assert _listed(hosts, dst) == [
                line for line in _listed(hosts, src) if OTHER not in line]
            limit = kernel_timeouts(dst).tcp[3]
            assert limit == 7200
            for line in hosts.check(dst, ["conntrack", "-L"]).splitlines():
                timeout = int(line.split()[2])
                assert 300 - 5 <= timeout <= limit
            # a foreign entry in a delta is refused before anything reaches the kernel
            foreign = stream.from_entries([tcp_entry(OTHER, PEER, 5000)])
            with pytest.raises(ForeignEntryError):
                stage.apply(foreign)
            assert _count(hosts, dst, "-s", OTHER) == 0
            assert stage.abort() == 110
    assert _count(hosts, dst) == 0
    assert _count(hosts, src, "-s", VM) == 109  # the source is never touched


def test_stage_keeps_what_the_destination_had_before(hosts: Hosts) -> None:
    src, dst = hosts.add("src"), hosts.add("dst")
    vm = parse_vm(VM)
    _insert(hosts, src, VM, PEER, 1000)
    _insert(hosts, src, VM, PEER, 1001)
    _insert(hosts, dst, VM, PEER, 1000)  # already there
    with Stage(vm, dst) as stage:
        entries = stream.from_entries([e for e in stream.entries(_vm_dump(src, vm))])
        report = stage.apply(entries)
        assert (report.created, report.updated) == (1, 1)
        assert stage.abort() == 1
    assert [wire.parse_entry(*e).orig.sport for e in stream.entries(_vm_dump(dst, vm))] == [1000]


def test_device_precopy_sessions_stage_deltas_and_expire(hosts: Hosts) -> None:
    from xfer import bundle as bundle_mod
    from xfer.agent.precopy import PrecopySource, PrecopyStages
    from xfer.bundle import Bundle
    from xfer.conntrack.delta import read_delta
    from xfer.conntrack.transfer import import_section
    from xfer.errors import BundleError, UsageError

    src, dst = hosts.add("src"), hosts.add("dst")
    vm = parse_vm(VM)
    for port in range(1000, 1020):
        _insert(hosts, src, VM, PEER, port)
    source = PrecopySource(src)
    stages = PrecopyStages(dst, expire_s=60)
    try:
        whole = source.open(vm)
        # travels in a bundle like any section; an importer that knows no deltas refuses it
        data = bundle_mod.encode(Bundle(vm, {"device": "s"}, {whole.kind: whole}))
        whole = bundle_mod.decode(data).sections[whole.kind]
        with pytest.raises(BundleError):
            import_section(whole, bundle_mod.decode(data), dst)
        report, state = stages.apply("m1", vm, whole)
        assert report.created == 20 and _count(hosts, dst) == 20
        hosts.check(src, ["conntrack", "-D", "-s", VM, "-p", "tcp", "--sport", "1000"])
        _insert(hosts, src, VM, PEER, 2000)
        delta = source.changes(vm, state.cursor)
        assert (read_delta(delta).upserts.offsets.__len__(), len(read_delta(delta).deletes)) == (1, 1)
        with pytest.raises(UsageError):   # a delta for a session never staged here
            stages.apply("m2", vm, delta)
        report, state = stages.apply("m1", vm, delta, final=True)
        assert (report.created, report.deleted) == (1, 1) and state.deltas == 1
        assert _facts(_vm_dump(dst, vm)) == _facts(_vm_dump(src, vm))
        # a second session for the VM, then silence: it expires and its entries go
        hosts.check(dst, ["conntrack", "-F"])
        stages.apply("m3", vm, source.open(vm))
        assert _count(hosts, dst) == 20
        assert stages.expire(time.monotonic() + 120) == ["m1", "m3"]
        assert _count(hosts, dst) == 0
        assert source.stats()["tracked_vms"] == 1
    finally:
        stages.close()
        source.close()


def test_concurrent_exports_share_one_walk_and_each_gets_its_own(hosts: Hosts) -> None:
    import asyncio

    from xfer.agent.exports import SharedExports

    ns = hosts.add("src")
    vms = [parse_vm(f"10.0.1.{i}") for i in range(2, 7)]
    for i, vm in enumerate(vms):
        _inject(ns, vm.addresses[0], range(1000, 1010 + i))
    _inject(ns, OTHER, range(1000, 1100))

    async def together() -> list[stream.Stream]:
        shared = SharedExports(ns)
        out = await asyncio.gather(*(shared.export(vm) for vm in vms))
        assert shared.served == len(vms) and shared.walks <= 2  # the first alone, the rest together
        return out

    for vm, got in zip(vms, asyncio.run(together()), strict=True):
        assert _facts(got) == _facts(_vm_dump(ns, vm))
        assert len(got) == 10 + vms.index(vm)
