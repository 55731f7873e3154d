"""The ``counters`` kind: export, import and forget a VM's counters (see ``xfer.transfer``).

* export: the VM's total on the device (datapath counts + counts carried in
  earlier), summed over the interfaces that count, as one section.
* import: ADDS the section's counts to what the destination already counted, in
  the carried table of its counting interface (``dev=`` or the only one): the
  new table goes into the idle half and one header update commits it. The
  bundle id is recorded in ``xfer_ctr_imported``: importing a bundle twice adds
  once. A section naming another VM, or holding a (MAC, IP) that is not the
  bundle VM's, is refused with ForeignEntryError before anything changes.
* forget: deletes the VM's entries (datapath map and carried table) on every
  counting interface.

Options (``--kinds counters`` through ``xfer.transfer``): ``dev`` (interface),
``batch`` (False forces the per-key path; benchmarks use it), ``root`` (pin root).

    section = export_section(parse_vm("10.0.0.2,02:00:00:00:00:02"), "fw-src")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from xfer import netns as xnetns
from xfer.bundle import Bundle, Section
from xfer.counters import model as counters
from xfer.counters.device import locked, open_all, open_maps
from xfer.counters.maps import CarriedCounters, CounterMaps, LiveCounters
from xfer.ebpf import loader
from xfer.errors import ForeignEntryError, ImportFailed, NamespaceNotFound, XferError
from xfer.model import Kind, KindReport, VmIdentity


def _check_ns(namespace: str | None) -> None:
    if namespace and not xnetns.exists(namespace):
        raise NamespaceNotFound(namespace)


def _read_live(live: LiveCounters, sel: counters.Selection | None,
               batch: bool) -> counters.Columns:
    """Selected datapath entries: by key when few are known, else a filtered dump."""
    if sel is None:
        return live.read_columns(batch)
    if sel.keys is not None:
        return live.read_keys(sel.keys)
    return live.read_columns(batch).select(sel)


def _read_carried(carried: CarriedCounters, sel: counters.Selection | None,
                  batch: bool) -> counters.Columns:
    """Selected carried entries (the table is read whole: a header and a few pages)."""
    table = carried.read(batch=batch)
    return table if sel is None else table.select(sel)


def read_totals(maps: CounterMaps, sel: counters.Selection | None,
                batch: bool = True) -> counters.Columns:
    """Datapath + carried counts of one interface for ``sel`` (everything for None)."""
    with locked(maps, shared=True):
        carried = _read_carried(maps.carried, sel, batch)
    return counters.add_columns(_read_live(maps.live, sel, batch), carried)


def export_columns(sel: counters.Selection | None, namespace: str | None = None, *,
                   dev: str | None = None, batch: bool = True,
                   root: Path = loader.PIN_ROOT) -> counters.Columns:
    """The selected totals on the device, summed over its counting interfaces.

    The bulk path (many VMs at once) and the core of ``export_section`` and ``show``.
    """
    _check_ns(namespace)
    all_maps = open_all(namespace, dev, root)
    try:
        return counters.add_columns(*(read_totals(m, sel, batch) for m in all_maps))
    finally:
        for m in all_maps:
            m.close()


def show(vm: VmIdentity | None, namespace: str | None = None, *, dev: str | None = None,
         root: Path = loader.PIN_ROOT) -> counters.Table:
    """The totals the device holds (for ``vm`` or all), summed over its counting interfaces.

    >>> counters.rows(show(None, "fw-src"))  # doctest: +SKIP
    [{'mac': '02:00:00:00:00:02', 'ip': '10.0.0.2', 'tx_packets': 200, ...}]
    """
    sel = counters.selection(vm) if vm is not None else None
    return export_columns(sel, namespace, dev=dev, root=root).table()


def export_section(vm: VmIdentity, namespace: str | None = None, *, dev: str | None = None,
                   batch: bool = True, root: Path = loader.PIN_ROOT, **_: Any) -> Section:
    """The VM's counters on this device as a bundle section.

    >>> export_section(parse_vm("10.0.0.2,02:00:00:00:00:02"), "fw-src").count  # doctest: +SKIP
    1
    """
    cols = export_columns(counters.selection(vm), namespace, dev=dev, batch=batch, root=root)
    return counters.encode_section(vm, cols)


def import_section(section: Section, bundle: Bundle, namespace: str | None = None, *,
                   dev: str | None = None, vm: VmIdentity | None = None, batch: bool = True,
                   root: Path = loader.PIN_ROOT, **_: Any) -> KindReport:
    """Add the section's counts to the destination's; a bundle already imported changes nothing.

    >>> import_section(b.sections[Kind.COUNTERS], b, "fw-dst").created  # doctest: +SKIP
    1
    """
    if vm is not None and not vm.same_vm(bundle.vm):
        raise ForeignEntryError(f"bundle is for VM {bundle.vm.id}, not for {vm.id}")
    incoming = counters.decode_section(section, bundle.vm)  # refuses before any change
    return import_columns(incoming, bundle.id, namespace, dev=dev, batch=batch, root=root)


def import_columns(incoming: counters.Columns, bundle_id: str, namespace: str | None = None, *,
                   dev: str | None = None, batch: bool = True,
                   root: Path = loader.PIN_ROOT) -> KindReport:
    """Add already validated entries to the carried counts, once per ``bundle_id``.

    All or nothing: on failure the carried counts are as before and ImportFailed is raised.
    """
    started = time.perf_counter()
    report = KindReport(Kind.COUNTERS)
    _check_ns(namespace)
    with open_maps(namespace, dev, root) as maps, locked(maps):
        if maps.imported.seen(bundle_id):
            report.skipped = len(incoming)
            report.warnings.append(f"bundle {bundle_id} was already imported here: nothing added")
        else:
            _add_carried(maps, bundle_id, incoming, batch, report)
    report.seconds = time.perf_counter() - started
    return report


def _add_carried(maps: CounterMaps, bundle_id: str, incoming: counters.Columns, batch: bool,
                 report: KindReport) -> None:
    carried = maps.carried
    before = carried.state()
    try:
        total, both = counters.merge(carried.read(before, batch), incoming)
        carried.commit(carried.stage(total, before, batch))
    except XferError as exc:
        report.failed = len(incoming)
        raise ImportFailed(f"counters import failed, nothing changed: {exc}", report) from None
    try:
        recorded = maps.imported.record(bundle_id)
        reason = "" if recorded else f"bundle {bundle_id} was imported concurrently"
    except XferError as exc:
        recorded, reason = False, str(exc)
    if not recorded:
        carried.commit(before)  # the old half is intact: we hold the lock, nobody wrote it
        report.failed = len(incoming)
        report.rolled_back = True
        raise ImportFailed(f"counters import failed and was rolled back: {reason}", report)
    report.updated = both  # keys already carried here
    report.created = len(incoming) - both


def _forget_carried(carried: CarriedCounters, sel: counters.Selection, batch: bool) -> int:
    """Drop the selected entries from the carried table; returns how many went."""
    before = carried.state()
    table = carried.read(before, batch)
    rest = table.exclude(sel)
    if len(rest) != len(table):
        carried.commit(carried.stage(rest, before, batch))
    return len(table) - len(rest)


def forget(vm: VmIdentity, namespace: str | None = None, *, dev: str | None = None,
           batch: bool = True, root: Path = loader.PIN_ROOT, **_: Any) -> KindReport:
    """Delete the VM's counters from every counting interface (the source, after commit)."""
    started = time.perf_counter()
    _check_ns(namespace)
    report = KindReport(Kind.COUNTERS)
    sel = counters.selection(vm)
    all_maps = open_all(namespace, dev, root)
    try:
        for maps in all_maps:
            with locked(maps):
                live = _read_live(maps.live, sel, batch)
                report.deleted += maps.live.delete(live.key_list(), batch)
                report.deleted += _forget_carried(maps.carried, sel, batch)
    finally:
        for m in all_maps:
            m.close()
    report.seconds = time.perf_counter() - started
    return report
