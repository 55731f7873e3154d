"""Export, import and forget a VM's DHCP bindings (the ``dhcp`` kind). No bcc here.

A binding travels as JSON records with the lease as *remaining seconds* at
export: the devices' clocks need not agree, and CLOCK_BOOTTIME deadlines mean
nothing on another box. The time in transit (the pause window) is not taken off,
because measuring it would need the two wall clocks to agree; the destination's
lease therefore outlives the source's by that transit time at most.

The binding's port is the source device's interface name. At the destination
it is used if it names an untrusted port there, else the only untrusted port,
else any untrusted port until the VM's first packet pins it (with a warning).

    section = export_section(parse_vm("10.0.0.2"), "sw-a")
    import_section(section, bundle, "sw-b")     # the VM passes sw-b's source guard at once
"""

from __future__ import annotations

import json
import time

from xfer.bundle import Bundle, Section
from xfer.dhcp.model import Binding, check_owned, for_vm
from xfer.dhcp.store import BindingTable
from xfer.errors import BundleError, ImportFailed, UsageError, XferError
from xfer.model import Kind, KindReport, VmIdentity

ENCODING = "dhcp-bindings/1"
MAX_BINDINGS = 1024


def export_section(vm: VmIdentity, namespace: str | None = None, **_: object) -> Section:
    """The VM's unexpired bindings on the device as a bundle section.

    >>> export_section(parse_vm("10.0.0.2,02:00:00:00:00:02"), "sw-a").count  # doctest: +SKIP
    1
    """
    with BindingTable(namespace) as table:
        mine = for_vm(table.bindings(), vm)
    payload = json.dumps([b.to_json() for b in mine], separators=(",", ":")).encode()
    return Section(Kind.DHCP, ENCODING, len(mine), payload)


def section_bindings(section: Section) -> list[Binding]:
    """Decode and validate a section's records; BundleError on any defect."""
    if section.encoding != ENCODING:
        raise BundleError(f"dhcp section encoding {section.encoding!r} is not supported")
    if section.count > MAX_BINDINGS:
        raise BundleError(f"dhcp section claims {section.count} bindings, over {MAX_BINDINGS}")
    try:
        records = json.loads(section.payload)
        if not isinstance(records, list):
            raise BundleError("dhcp section is not a list of bindings")
        bindings = [Binding.from_json(r) for r in records]
    except (ValueError, TypeError, AttributeError, UsageError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"dhcp section is corrupted: {exc}") from None
    if len(bindings) != section.count:
        raise BundleError(f"dhcp section holds {len(bindings)} bindings, header says "
                          f"{section.count}")
    return bindings


def import_section(section: Section, bundle: Bundle, namespace: str | None = None, *,
                   replace: bool = True, vm: VmIdentity | None = None, persist: bool = True,
                   **_: object) -> KindReport:
    """Install the bundle's bindings for its VM; all or nothing.

    Every binding must belong to ``vm`` (default: the bundle's VM), or
    ForeignEntryError is raised before anything changes. Expired ones are skipped.
    The bindings are enforceable when this returns; ``persist`` then rewrites the
    snooping database file (not fsynced: ``xfer dhcp serve`` syncs it), which
    ``report.seconds`` does not include because the VM need not wait for it.
    """
    started = time.perf_counter()
    report = KindReport(Kind.DHCP)
    bindings = check_owned(section_bindings(section), vm or bundle.vm)
    live = [b for b in bindings if not b.expired]
    report.skipped = len(bindings) - len(live)
    with BindingTable(namespace) as table:
        before = [(b, table.map.get(b.key())) for b in live]   # raw values, for a rollback
        try:
            result = table.add(live, replace_existing=replace, save=False)
        except XferError as exc:
            # roll back: drop what this import created, put back what it replaced
            table.remove([b for b, old in before if old is None], save=False)
            for b, old in before:
                if old is not None:
                    table.map.put(b.key(), old)
            report.failed = len(live)
            report.rolled_back = True
            report.errors.append(str(exc))
            report.seconds = time.perf_counter() - started
            raise ImportFailed(f"dhcp import failed ({exc}); rolled back", report) from None
        report.created, report.updated = result.created, result.updated
        report.skipped += len(live) - result.created - result.updated
        report.warnings = result.warnings
        report.seconds = time.perf_counter() - started
        if persist:
            table.save(sync=False)
    return report


def forget(vm: VmIdentity, namespace: str | None = None, **_: object) -> KindReport:
    """Remove the VM's bindings (on the source, once the destination has committed)."""
    started = time.perf_counter()
    report = KindReport(Kind.DHCP)
    with BindingTable(namespace) as table:
        mine = for_vm(table.bindings(include_expired=True), vm)
        report.deleted = table.remove(mine)
    report.skipped = len(mine) - report.deleted
    report.seconds = time.perf_counter() - started
    return report
