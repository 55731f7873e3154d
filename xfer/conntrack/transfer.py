"""Export, import and forget a VM's conntrack entries. No sockets here: see ``netlink``.

Which entries belong to a VM: those where the VM is an endpoint, i.e. the
source of the original tuple (it opened the connection, NATed or not) or the
source of the reply tuple (it answers, behind DNAT or not). Entries where a VM
address only appears as a destination that NAT redirected elsewhere are not the
VM's connections, and importing them would open the firewall for another host.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import NamedTuple

from xfer.bundle import Bundle, Section
from xfer.conntrack import constants as c
from xfer.conntrack import wire
from xfer.conntrack.hooks import nat_hooks_registered
from xfer.conntrack.model import ConntrackEntry
from xfer.conntrack.netlink import BatchInterrupted, CtNetlink, dump_many, table_size
from xfer.errors import BundleError, ForeignEntryError, ImportFailed, KernelError
from xfer.model import Kind, KindReport, VmIdentity

log = logging.getLogger(__name__)

ENCODING = "ctnetlink/1"
_NAT_BITS = c.IPS_SRC_NAT | c.IPS_DST_NAT
_REC = struct.Struct(">BxH")
MAX_ENTRIES = 2_000_000
# Below this many entries one unfiltered walk beats two or three filtered ones.
SMALL_TABLE = 4096


class RawEntry(NamedTuple):
    """One entry as the kernel dumped it: family and attribute bytes."""

    family: int
    blob: bytes


class Selectors(NamedTuple):
    """Optional narrowing of an export: conntrack zone, and mark under mask."""

    zone: int | None = None
    mark: int | None = None
    mask: int = 0xFFFFFFFF


def _families(vm: VmIdentity) -> Iterator[tuple[int, bytes]]:
    for addr in sorted(vm.packed_addresses):
        yield (socket.AF_INET if len(addr) == 4 else socket.AF_INET6), addr


def _kernel_dump(namespace: str | None, vm: VmIdentity, sel: Selectors) -> list[RawEntry]:
    owned = vm.packed_addresses
    extra: dict[str, object] = {"zone": sel.zone, "mark": sel.mark, "mark_mask": sel.mask}
    v4 = [a for f, a in _families(vm) if f == socket.AF_INET]
    v6 = [a for f, a in _families(vm) if f == socket.AF_INET6]

    def requests(family: int, addrs: list[bytes]) -> list[tuple[int, dict[str, object]]]:
        return ([(family, {"orig_src": a, **extra}) for a in addrs]
                + [(family, {"reply_src": a, **extra}) for a in addrs])

    jobs = requests(socket.AF_INET, v4)
    if v6:  # the probe runs beside the IPv4 dumps; see _ipv6_filter_inverted
        jobs.append((socket.AF_INET6, {"orig_src": bytes(16), **extra}))
    results = dump_many(namespace, jobs)
    out = _merge(socket.AF_INET, results[:2 * len(v4)], len(v4), owned)
    if v6:
        probe = results[-1]
        if probe:
            _ipv6_filter_inverted(probe)
            out.extend(RawEntry(socket.AF_INET6, b) for b in probe if belongs(b, owned))
        else:
            out.extend(_merge(socket.AF_INET6, dump_many(namespace, requests(socket.AF_INET6, v6)),
                              len(v6), owned))
    return out


def _merge(family: int, dumps: list[list[bytes]], n_orig: int, owned: frozenset[bytes]) -> list[RawEntry]:
    """Original-source dumps, then reply-source dumps without what those already hold.

    Original-source dumps cannot overlap (an entry has one original source); a
    reply-source match whose original source is also the VM's is in them already.
    """
    out = [RawEntry(family, b) for blobs in dumps[:n_orig] for b in blobs]
    for blobs in dumps[n_orig:]:
        for blob in blobs:
            if wire.tuple_src(blob) not in owned:
                out.append(RawEntry(family, blob))
    return out


def _ipv6_filter_inverted(probe: list[bytes]) -> None:
    """Say that the kernel's IPv6 address filter is inverted (the probe answered).

    NOTE: on this kernel (6.18) ctnetlink_filter_match_tuple() compares IPv6
    addresses with ``!ipv6_addr_cmp()``, the wrong way round: a CTA_FILTER on an
    IPv6 address returns the entries that do *not* carry it. We ask for the
    unspecified address, which no tuple carries: a correct kernel answers nothing,
    an inverted one answers every IPv6 entry — the very dump we then filter in
    user space, so the probe costs no extra walk where the bug is.
    """
    log.info("kernel IPv6 conntrack filter is inverted; filtered %d IPv6 entries in user space",
             len(probe))


def _userspace_dump(namespace: str | None, vm: VmIdentity, sel: Selectors) -> list[RawEntry]:
    """One walk of the table, every family, filtered here."""
    owned = vm.packed_addresses
    with CtNetlink(namespace) as ct:
        return [RawEntry(family, blob) for family, blob in
                ct.dump_all(zone=sel.zone, mark=sel.mark, mark_mask=sel.mask)
                if belongs(blob, owned)]


def belongs(blob: bytes, owned: frozenset[bytes]) -> bool:
    """True when the VM is an endpoint of the entry (see the module docstring)."""
    orig_src, reply_src, _ = wire.endpoint_sources(blob)
    return orig_src in owned or reply_src in owned


def export_entries(vm: VmIdentity, namespace: str | None = None,
                   selectors: Selectors = Selectors()) -> list[RawEntry]:
    """The VM's entries in ``namespace``, filtered in the kernel (CTA_FILTER).

    Every dump walks the kernel's whole conntrack hash, which all namespaces
    share, and a VM needs two or three filtered dumps. A namespace holding few
    entries is cheaper to dump once and filter here. Falls back to filtering here,
    with a log line, where the kernel refuses the filter.

    >>> export_entries(parse_vm("10.0.0.2"), "fw-src")   # doctest: +SKIP
    """
    if table_size(namespace) <= SMALL_TABLE:
        return _userspace_dump(namespace, vm, selectors)
    try:
        return _kernel_dump(namespace, vm, selectors)
    except KernelError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        log.warning("kernel refused the conntrack dump filter (%s); filtering in user space", exc)
    return _userspace_dump(namespace, vm, selectors)


def encode_entries(entries: list[RawEntry]) -> bytes:
    pack = _REC.pack
    return b"".join(b for e in entries for b in (pack(e.family, len(e.blob)), e.blob))


def decode_entries(payload: bytes, count: int) -> list[RawEntry]:
    if count > MAX_ENTRIES:
        raise BundleError(f"conntrack section claims {count} entries, over the limit of {MAX_ENTRIES}")
    out: list[RawEntry] = []
    pos, end = 0, len(payload)
    unpack = _REC.unpack_from
    while pos < end:
        if pos + 4 > end:
            raise BundleError("conntrack section is truncated")
        family, length = unpack(payload, pos)
        pos += 4
        if family not in (socket.AF_INET, socket.AF_INET6) or pos + length > end:
            raise BundleError(f"conntrack section is corrupted at entry {len(out)}")
        out.append(RawEntry(family, payload[pos:pos + length]))
        pos += length
    if len(out) != count:
        raise BundleError(f"conntrack section holds {len(out)} entries, header says {count}")
    return out


def export_section(vm: VmIdentity, namespace: str | None = None,
                   selectors: Selectors = Selectors()) -> Section:
    """The VM's conntrack entries as a bundle section."""
    return export_section_from(export_entries(vm, namespace, selectors), selectors)


def export_section_from(entries: list[RawEntry], selectors: Selectors = Selectors()) -> Section:
    meta = {"zone": selectors.zone, "mark": selectors.mark, "mask": selectors.mask}
    return Section(Kind.CONNTRACK, ENCODING, len(entries), encode_entries(entries), meta)


def section_entries(section: Section) -> list[ConntrackEntry]:
    """Readable records of a section (for `xfer bundle show`)."""
    return [wire.parse_entry(e.family, e.blob) for e in decode_entries(section.payload, section.count)]


def _validated(section: Section, vm: VmIdentity) -> tuple[list[RawEntry], int]:
    """The section's entries, once each is known to be well formed and the VM's,
    and how many of them are NATed."""
    if section.encoding != ENCODING:
        raise BundleError(f"conntrack section encoding {section.encoding!r} is not supported")
    owned = vm.packed_addresses
    entries = decode_entries(section.payload, section.count)
    nated = 0
    for i, entry in enumerate(entries):
        try:
            orig_src, reply_src, status = wire.endpoint_sources(entry.blob)
        except (ValueError, KeyError, IndexError, struct.error):
            raise BundleError(f"conntrack entry {i} is malformed") from None
        nated += bool(status & _NAT_BITS)
        if orig_src not in owned and reply_src not in owned:
            e = wire.parse_entry(entry.family, entry.blob)
            raise ForeignEntryError(
                f"conntrack entry {i} ({e.orig.src} -> {e.orig.dst}) does not belong to VM "
                f"{vm.id} ({', '.join(vm.addresses)}); nothing imported")
    return entries, nated


def import_section(section: Section, bundle: Bundle, namespace: str | None = None, *,
                   replace: bool = True, partial: bool = False,
                   vm: VmIdentity | None = None) -> KindReport:
    """Inject a bundle's conntrack entries; all or nothing unless ``partial``.

    Every entry is checked to belong to ``vm`` (default: the bundle's VM) before
    anything touches the kernel. Entries are created in batches; existing ones are
    updated (``replace``) or skipped. If any entry fails, what this import created
    is deleted again and ImportFailed carries the report.
    """
    started = time.perf_counter()
    report = KindReport(Kind.CONNTRACK)
    entries, nated = _validated(section, vm or bundle.vm)
    age = int(bundle.age())
    if nated and nat_hooks_registered(namespace) is False:
        raise ImportFailed(
            f"{nated} NATed connections need NAT hooks at the destination, and namespace "
            f"{namespace or '(current)'} has none (add any nat-type chain, even empty); "
            "nothing imported")
    with CtNetlink(namespace) as ct:
        base = ct.reserve(len(entries))
        try:
            failures = ct.batch((base + i, wire.create_message(e.family, e.blob, base + i, age=age))
                                for i, e in enumerate(entries))
        except BatchInterrupted as exc:
            # A malformed entry stopped the batch: undo what went in before it.
            sent = [i for i in range(exc.sent) if base + i not in exc.failures]
            undone = len(sent) - len(_delete(ct, entries, sent))
            raise BundleError(f"conntrack entry {exc.sent} is malformed ({exc.__cause__}); "
                              f"rolled back {undone} created entries") from None
        created = [i for i in range(len(entries)) if base + i not in failures]
        existing = [i for i in range(len(entries)) if failures.get(base + i) == errno.EEXIST]
        hard = {i: err for i in range(len(entries))
                if (err := failures.get(base + i, 0)) and err != errno.EEXIST}
        report.created = len(created)
        if existing and replace:
            ubase = ct.reserve(len(existing))
            ufail = ct.batch((ubase + j, wire.create_message(entries[i].family, entries[i].blob,
                                                             ubase + j, age=age, update=True))
                             for j, i in enumerate(existing))
            for j, i in enumerate(existing):
                if ubase + j in ufail:
                    hard[i] = ufail[ubase + j]
                else:
                    report.updated += 1
        else:
            report.skipped = len(existing)
        for i, err in sorted(hard.items()):
            e = wire.parse_entry(entries[i].family, entries[i].blob)
            report.errors.append(f"{e.summary()}: {os.strerror(err)}")
        report.failed = len(hard)
        if hard and not partial:
            left = _delete(ct, entries, created)
            report.rolled_back = True
            report.seconds = time.perf_counter() - started
            raise ImportFailed(
                f"{len(hard)} of {len(entries)} conntrack entries failed ({report.errors[0]}); "
                f"rolled back {len(created) - len(left)} created entries", report)
    report.seconds = time.perf_counter() - started
    return report


def _delete(ct: CtNetlink, entries: list[RawEntry], indices: list[int]) -> dict[int, int]:
    """Delete the entries at ``indices`` from a table they were imported into (a rollback)."""
    base = ct.reserve(len(indices))
    return ct.batch((base + j, wire.delete_message(entries[i].family, wire.split(entries[i].blob),
                                                   base + j, same_table=False))
                    for j, i in enumerate(indices))


def forget(vm: VmIdentity, namespace: str | None = None,
           selectors: Selectors = Selectors()) -> KindReport:
    """Delete the VM's entries (on the source, once the destination has committed)."""
    started = time.perf_counter()
    report = KindReport(Kind.CONNTRACK)
    entries = export_entries(vm, namespace, selectors)
    with CtNetlink(namespace) as ct:
        base = ct.reserve(len(entries))
        failures = ct.batch((base + i, wire.delete_message(e.family, wire.split(e.blob), base + i,
                                                       same_table=True))
                            for i, e in enumerate(entries))
    gone = sum(1 for err in failures.values() if err == errno.ENOENT)  # expired meanwhile
    report.failed = len(failures) - gone
    report.deleted = len(entries) - len(failures)
    report.skipped = gone
    report.errors = [os.strerror(err) for err in failures.values() if err != errno.ENOENT][:20]
    report.seconds = time.perf_counter() - started
    return report


def list_entries(vm: VmIdentity | None, namespace: str | None = None,
                 selectors: Selectors = Selectors()) -> list[ConntrackEntry]:
    """Readable entries of the VM (or of the whole table when ``vm`` is None)."""
    if vm is not None:
        raw = export_entries(vm, namespace, selectors)
    else:
        with CtNetlink(namespace) as ct:
            raw = [RawEntry(f, b) for f, b in ct.dump_all(zone=selectors.zone, mark=selectors.mark,
                                                           mark_mask=selectors.mask)]
    return [wire.parse_entry(e.family, e.blob) for e in raw]
