"""The ``counters`` kind: export, import and forget a VM's counters (see ``xfer.transfer``).

* export: the VM's total on the device (datapath counts + counts carried in
  earlier), summed over the interfaces that count, as one section.
* import: ADDS the section's counts to what the destination already counted, in
  ``xfer_ctr_base`` of its counting interface (``dev=`` or the only one). The
  bundle id is recorded in ``xfer_ctr_imported``: importing a bundle twice adds
  once. A section naming another VM, or holding a (MAC, IP) that is not the
  bundle VM's, is refused with ForeignEntryError before anything changes.
* forget: deletes the VM's entries (both maps) on every counting interface.

Options (``--kinds counters`` through ``xfer.transfer``): ``dev`` (interface),
``batch`` (False forces the per-key path; benchmarks use it), ``root`` (pin root).

    section = export_section(parse_vm("10.0.0.2,02:00:00:00:00:02"), "fw-src")
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xfer import netns as xnetns
from xfer.bundle import Bundle, Section
from xfer.ebpf import counters, loader
from xfer.ebpf.counter_maps import CounterMaps, CounterTable
from xfer.ebpf.counters_device import locked, open_all, open_maps
from xfer.errors import ForeignEntryError, ImportFailed, NamespaceNotFound, XferError
from xfer.model import Kind, KindReport, VmIdentity

# Above this many keys a full batch dump beats one lookup syscall per key.
_LOOKUP_LIMIT = 64


def _check_ns(namespace: str | None) -> None:
    if namespace and not xnetns.exists(namespace):
        raise NamespaceNotFound(namespace)


def _read(table: CounterTable, keys: Sequence[bytes] | None, vm: VmIdentity | None,
          batch: bool) -> counters.Table:
    """The VM's entries of one map: by key when few are known, else a filtered dump."""
    if keys is not None and len(keys) <= _LOOKUP_LIMIT:
        return table.read(keys)
    return counters.select(table.read_all(batch), vm)


def read_totals(maps: CounterMaps, vm: VmIdentity | None, batch: bool = True) -> counters.Table:
    """Datapath + carried counts of one interface for ``vm`` (everything for None)."""
    keys = counters.vm_keys(vm) if vm is not None else None
    return counters.add(_read(maps.live, keys, vm, batch), _read(maps.carried, keys, vm, batch))


def show(vm: VmIdentity | None, namespace: str | None = None, *, dev: str | None = None,
         root: Path = loader.PIN_ROOT) -> counters.Table:
    """The totals the device holds (for ``vm`` or all), summed over its counting interfaces.

    >>> counters.rows(show(None, "fw-src"))  # doctest: +SKIP
    [{'mac': '02:00:00:00:00:02', 'ip': '10.0.0.2', 'tx_packets': 200, ...}]
    """
    _check_ns(namespace)
    all_maps = [open_maps(namespace, dev, root)] if dev else open_all(namespace, root)
    try:
        return counters.add(*(read_totals(m, vm) for m in all_maps))
    finally:
        for m in all_maps:
            m.close()


def export_section(vm: VmIdentity, namespace: str | None = None, *, dev: str | None = None,
                   batch: bool = True, root: Path = loader.PIN_ROOT, **_: Any) -> Section:
    """The VM's counters on this device as a bundle section.

    >>> export_section(parse_vm("10.0.0.2,02:00:00:00:00:02"), "fw-src").count  # doctest: +SKIP
    1
    """
    _check_ns(namespace)
    all_maps = [open_maps(namespace, dev, root)] if dev else open_all(namespace, root)
    try:
        table = counters.add(*(read_totals(m, vm, batch) for m in all_maps))
    finally:
        for m in all_maps:
            m.close()
    return counters.encode_section(vm, table)


def import_section(section: Section, bundle: Bundle, namespace: str | None = None, *,
                   dev: str | None = None, vm: VmIdentity | None = None, batch: bool = True,
                   root: Path = loader.PIN_ROOT, **_: Any) -> KindReport:
    """Add the section's counts to the destination's; a bundle already imported changes nothing.

    >>> import_section(b.sections[Kind.COUNTERS], b, "fw-dst").created  # doctest: +SKIP
    1
    """
    started = time.perf_counter()
    report = KindReport(Kind.COUNTERS)
    if vm is not None and not vm.same_vm(bundle.vm):
        raise ForeignEntryError(f"bundle is for VM {bundle.vm.id}, not for {vm.id}")
    incoming = counters.decode_section(section, bundle.vm)  # refuses before any change
    _check_ns(namespace)
    with open_maps(namespace, dev, root) as maps, locked(maps):
        if maps.imported.seen(bundle.id):
            report.skipped = len(incoming)
            report.warnings.append(f"bundle {bundle.id} was already imported here: nothing added")
        else:
            _add_carried(maps, bundle.id, incoming, batch, report)
    report.seconds = time.perf_counter() - started
    return report


def _add_carried(maps: CounterMaps, bundle_id: str, incoming: counters.Table, batch: bool,
                 report: KindReport) -> None:
    keys = list(incoming)
    before = (maps.carried.read(keys) if len(keys) <= _LOOKUP_LIMIT
              else {k: v for k, v in maps.carried.read_all(batch).items() if k in incoming})
    try:
        maps.carried.write(counters.add(before, incoming), batch)
        if not maps.imported.record(bundle_id):
            raise ImportFailed(f"bundle {bundle_id} was imported concurrently")
    except XferError as exc:
        _restore(maps, before, keys)
        report.failed = len(keys)
        report.rolled_back = True
        raise ImportFailed(f"counters import failed and was rolled back: {exc}", report) from None
    report.created = sum(k not in before for k in keys)
    report.updated = len(keys) - report.created


def _restore(maps: CounterMaps, before: counters.Table, keys: Sequence[bytes]) -> None:
    maps.carried.write(before)
    maps.carried.delete([k for k in keys if k not in before])


def forget(vm: VmIdentity, namespace: str | None = None, *, dev: str | None = None,
           batch: bool = True, root: Path = loader.PIN_ROOT, **_: Any) -> KindReport:
    """Delete the VM's counters from every counting interface (the source, after commit)."""
    started = time.perf_counter()
    _check_ns(namespace)
    report = KindReport(Kind.COUNTERS)
    keys = counters.vm_keys(vm)
    all_maps = [open_maps(namespace, dev, root)] if dev else open_all(namespace, root)
    try:
        for maps in all_maps:
            with locked(maps):
                for table in (maps.live, maps.carried):
                    mine = list(_read(table, keys, vm, batch))
                    report.deleted += table.delete(mine, batch)
    finally:
        for m in all_maps:
            m.close()
    report.seconds = time.perf_counter() - started
    return report
