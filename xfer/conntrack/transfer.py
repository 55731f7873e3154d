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
from xfer.conntrack.netlink import CtNetlink
from xfer.errors import BundleError, ForeignEntryError, ImportFailed, KernelError
from xfer.model import Kind, KindReport, VmIdentity

log = logging.getLogger(__name__)

ENCODING = "ctnetlink/1"
_REC = struct.Struct(">BxH")
MAX_ENTRIES = 2_000_000


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


def _kernel_dump(ct: CtNetlink, vm: VmIdentity, sel: Selectors) -> list[RawEntry]:
    out: list[RawEntry] = []
    owned = vm.packed_addresses
    extra = {"zone": sel.zone, "mark": sel.mark, "mark_mask": sel.mask}
    families = [(f, a) for f, a in _families(vm)
                if f == socket.AF_INET or not _ipv6_filter_inverted(ct, out, owned, extra)]
    # Original-source dumps first: each entry has one original source, so these
    # cannot overlap. A reply-source match whose original source is also the VM's
    # was already taken by them.
    for family, addr in families:
        out.extend(RawEntry(family, b) for b in ct.dump(family, orig_src=addr, **extra))
    for family, addr in families:
        for blob in ct.dump(family, reply_src=addr, **extra):
            first = struct.unpack_from("=H", blob)[0]
            if wire.tuple_src(blob[:first]) not in owned:
                out.append(RawEntry(family, blob))
    return out


def _ipv6_filter_inverted(ct: CtNetlink, out: list[RawEntry], owned: frozenset[bytes],
                          extra: dict[str, int | None]) -> bool:
    """Probe the kernel's IPv6 address filter; if it is inverted, filter IPv6 here.

    NOTE: on this kernel (6.18) ctnetlink_filter_match_tuple() compares IPv6
    addresses with ``!ipv6_addr_cmp()``, the wrong way round: a CTA_FILTER on an
    IPv6 address returns the entries that do *not* carry it. We ask for the
    unspecified address, which no tuple carries: a correct kernel answers nothing,
    an inverted one answers every IPv6 entry — the very dump we then filter in
    user space, so the probe costs nothing extra where the bug is.
    """
    probe = list(ct.dump(socket.AF_INET6, orig_src=bytes(16), **extra))  # type: ignore[arg-type]
    if not probe:
        return False
    log.info("kernel IPv6 conntrack filter is inverted; filtering IPv6 entries in user space")
    out.extend(RawEntry(socket.AF_INET6, b) for b in probe if belongs(wire.split(b), owned))
    return True


def _userspace_dump(ct: CtNetlink, vm: VmIdentity, sel: Selectors) -> list[RawEntry]:
    out: list[RawEntry] = []
    owned = vm.packed_addresses
    for family in {f for f, _ in _families(vm)}:
        for blob in ct.dump(family, zone=sel.zone, mark=sel.mark, mark_mask=sel.mask):
            attrs = wire.split(blob)
            if belongs(attrs, owned):
                out.append(RawEntry(family, blob))
    return out


def belongs(attrs: dict[int, bytes], owned: frozenset[bytes]) -> bool:
    """True when the VM is an endpoint of the entry (see the module docstring)."""
    return (wire.tuple_src(attrs[c.CTA_TUPLE_ORIG]) in owned
            or wire.tuple_src(attrs[c.CTA_TUPLE_REPLY]) in owned)


def export_entries(vm: VmIdentity, namespace: str | None = None,
                   selectors: Selectors = Selectors(), ct: CtNetlink | None = None) -> list[RawEntry]:
    """The VM's entries in ``namespace``, filtered in the kernel (CTA_FILTER).

    Falls back to filtering in user space, with a log line, where the kernel
    refuses the filter.

    >>> export_entries(parse_vm("10.0.0.2"), "fw-src")   # doctest: +SKIP
    """
    own = ct is None
    ct = ct or CtNetlink(namespace)
    try:
        try:
            return _kernel_dump(ct, vm, selectors)
        except KernelError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("kernel refused the conntrack dump filter (%s); filtering in user space",
                        exc)
            return _userspace_dump(ct, vm, selectors)
    finally:
        if own:
            ct.close()


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
    entries = export_entries(vm, namespace, selectors)
    meta = {"zone": selectors.zone, "mark": selectors.mark, "mask": selectors.mask}
    return Section(Kind.CONNTRACK, ENCODING, len(entries), encode_entries(entries), meta)


def section_entries(section: Section) -> list[ConntrackEntry]:
    """Readable records of a section (for `xfer bundle show`)."""
    return [wire.parse_entry(e.family, e.blob) for e in decode_entries(section.payload, section.count)]


def _validated(section: Section, vm: VmIdentity) -> list[tuple[int, dict[int, bytes]]]:
    if section.encoding != ENCODING:
        raise BundleError(f"conntrack section encoding {section.encoding!r} is not supported")
    owned = vm.packed_addresses
    out: list[tuple[int, dict[int, bytes]]] = []
    for i, entry in enumerate(decode_entries(section.payload, section.count)):
        try:
            attrs = wire.split(entry.blob)
            ok = belongs(attrs, owned)
        except (ValueError, KeyError, IndexError):
            raise BundleError(f"conntrack entry {i} is malformed") from None
        if not ok:
            e = wire.parse_entry(entry.family, entry.blob)
            raise ForeignEntryError(
                f"conntrack entry {i} ({e.orig.src} -> {e.orig.dst}) does not belong to VM "
                f"{vm.id} ({', '.join(vm.addresses)}); nothing imported")
        out.append((entry.family, attrs))
    return out


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
    entries = _validated(section, vm or bundle.vm)
    age = int(bundle.age())
    with CtNetlink(namespace) as ct:
        nated = sum(1 for _, a in entries if wire.entry_status(a) & (c.IPS_SRC_NAT | c.IPS_DST_NAT))
        if nated and nat_hooks_registered(namespace) is False:
            raise ImportFailed(
                f"{nated} NATed connections need NAT hooks at the destination, and namespace "
                f"{namespace or 'current'} has none (add any nat-type chain, even empty); "
                "nothing imported")
        base = ct.reserve(2 * len(entries))
        failures = ct.batch((base + i, wire.create_message(fam, attrs, base + i, age=age))
                            for i, (fam, attrs) in enumerate(entries))
        existing = [i for i in range(len(entries)) if failures.get(base + i) == errno.EEXIST]
        created = [i for i in range(len(entries)) if base + i not in failures]
        hard = {i: failures[base + i] for i in range(len(entries))
                if base + i in failures and failures[base + i] != errno.EEXIST}
        report.created = len(created)
        if existing and replace:
            ubase = base + len(entries)
            ufail = ct.batch((ubase + j, wire.create_message(entries[i][0], entries[i][1],
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
            e = wire.parse_entry(entries[i][0], wire_blob(entries[i][1]))
            report.errors.append(f"{e.summary()}: {os.strerror(err)}")
        report.failed = len(hard)
        if hard and not partial:
            rollback = ct.batch((base + i, wire.delete_message(entries[i][0], entries[i][1], base + i))
                                for i in created)
            report.rolled_back = True
            report.seconds = time.perf_counter() - started
            left = len(rollback)
            raise ImportFailed(
                f"{len(hard)} of {len(entries)} conntrack entries failed ({report.errors[0]}); "
                f"rolled back {len(created) - left} created entries", report)
    report.seconds = time.perf_counter() - started
    return report


def wire_blob(attrs: dict[int, bytes]) -> bytes:
    return b"".join(attrs.values())


def forget(vm: VmIdentity, namespace: str | None = None,
           selectors: Selectors = Selectors()) -> KindReport:
    """Delete the VM's entries (on the source, once the destination has committed)."""
    started = time.perf_counter()
    report = KindReport(Kind.CONNTRACK)
    with CtNetlink(namespace) as ct:
        entries = export_entries(vm, namespace, selectors, ct=ct)
        base = ct.reserve(len(entries))
        failures = ct.batch((base + i, wire.delete_message(e.family, wire.split(e.blob), base + i))
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
    with CtNetlink(namespace) as ct:
        if vm is None:
            raw = [RawEntry(f, b) for f in (socket.AF_INET, socket.AF_INET6)
                   for b in ct.dump(f, zone=selectors.zone, mark=selectors.mark,
                                    mark_mask=selectors.mask)]
        else:
            raw = export_entries(vm, namespace, selectors, ct=ct)
    return [wire.parse_entry(e.family, e.blob) for e in raw]
