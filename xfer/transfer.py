"""A VM's state across kinds: export into a bundle, import from one, forget.

Each kind lives in its own module with the same three functions::

    export_section(vm, namespace, **options) -> Section
    import_section(section, bundle, namespace, **options) -> KindReport
    forget(vm, namespace, **options) -> KindReport

Kind modules are imported on first use: loading bcc for ``counters`` costs
tenths of a second that a conntrack-only export inside the pause window must not pay.
"""

from __future__ import annotations

import importlib
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from xfer.bundle import DEFAULT_MAX_AGE_S, Bundle, Section, check_fresh
from xfer.errors import ImportFailed, UsageError, XferError
from xfer.model import Kind, KindReport, VmIdentity

KIND_MODULES: dict[Kind, str] = {
    Kind.CONNTRACK: "xfer.conntrack.transfer",
    Kind.COUNTERS: "xfer.counters.transfer",
    Kind.DHCP: "xfer.dhcp.transfer",
    Kind.RULES: "xfer.rules.transfer",
}

# Import order inside one bundle: a VM's rules go in before its conntrack entries,
# so that no policy on the destination sees the VM's connections without its rules.
# Kinds not listed keep their place after these.
IMPORT_ORDER: tuple[Kind, ...] = (Kind.RULES, Kind.CONNTRACK, Kind.DHCP, Kind.COUNTERS)


def import_order(kinds: Iterable[Kind]) -> list[Kind]:
    """``kinds`` in the order an import applies them.

    >>> import_order([Kind.CONNTRACK, Kind.RULES])
    [<Kind.RULES: 'rules'>, <Kind.CONNTRACK: 'conntrack'>]
    """
    rank = {k: i for i, k in enumerate(IMPORT_ORDER)}
    return sorted(kinds, key=lambda k: rank.get(k, len(rank)))


def kind_module(kind: Kind) -> ModuleType:
    try:
        return importlib.import_module(KIND_MODULES[kind])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("xfer."):
            raise UsageError(f"kind {kind} is not available in this build of xfer") from None
        raise


Options = Mapping[Kind, Mapping[str, Any]]


def export_bundle(vm: VmIdentity, kinds: Iterable[Kind], namespace: str | None = None, *,
                  device: str | None = None, options: Options | None = None) -> Bundle:
    """Export the VM's state of each kind from one device into a bundle.

    >>> export_bundle(parse_vm("10.0.0.2"), [Kind.CONNTRACK], "fw-src")  # doctest: +SKIP
    """
    options = options or {}
    sections: dict[Kind, Section] = {}
    for kind in kinds:
        sections[kind] = kind_module(kind).export_section(vm, namespace, **options.get(kind, {}))
    source = {"device": device or socket.gethostname(), "netns": namespace}
    return Bundle(vm=vm, source=source, sections=sections)


@dataclass
class ImportReport:
    """Per-kind reports of one import and their totals (the ``--json`` contract)."""

    kinds: dict[Kind, KindReport] = field(default_factory=dict)
    errors: dict[Kind, str] = field(default_factory=dict)
    seconds: float = 0.0

    def total(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.kinds.values())

    @property
    def ok(self) -> bool:
        return not self.errors and self.total("failed") == 0

    def to_dict(self) -> dict[str, Any]:
        kinds: dict[str, Any] = {k.value: r.to_dict() for k, r in self.kinds.items()}
        for k, msg in self.errors.items():
            kinds.setdefault(k.value, {})["error"] = msg
        return {"created": self.total("created"), "updated": self.total("updated"),
                "skipped": self.total("skipped"), "failed": self.total("failed"),
                "kinds": kinds, "seconds": round(self.seconds, 6)}


def import_bundle(bundle: Bundle, namespace: str | None = None, *, vm: VmIdentity | None = None,
                  kinds: Iterable[Kind] | None = None, options: Options | None = None,
                  max_age_s: float = DEFAULT_MAX_AGE_S) -> ImportReport:
    """Import every section (or those of ``kinds``); each kind is all-or-nothing.

    ``vm``, when given, is the VM the request names: a bundle for another VM is refused.
    A bundle exported more than ``max_age_s`` ago (or in the future) is refused.
    """
    check_fresh(bundle, max_age_s)
    if vm is not None and not vm.same_vm(bundle.vm):
        raise UsageError(f"bundle holds state of VM {bundle.vm.id} "
                         f"({', '.join(bundle.vm.addresses)}), not of the VM requested")
    wanted = set(kinds) if kinds is not None else set(bundle.sections)
    options = options or {}
    started = time.perf_counter()
    report = ImportReport()
    for kind in import_order(bundle.sections):
        section = bundle.sections[kind]
        if kind not in wanted:
            continue
        try:
            report.kinds[kind] = kind_module(kind).import_section(
                section, bundle, namespace, **options.get(kind, {}))
        except XferError as exc:
            partial = getattr(exc, "report", None)
            if isinstance(partial, KindReport):
                report.kinds[kind] = partial
            report.errors[kind] = str(exc)
            # One kind's failed (rolled back) import is reported beside the others;
            # anything else (bad bundle, foreign entries, no namespace) stops here.
            if not isinstance(exc, ImportFailed):
                raise
    report.seconds = time.perf_counter() - started
    return report


def forget(vm: VmIdentity, kinds: Iterable[Kind], namespace: str | None = None, *,
           options: Options | None = None) -> dict[Kind, KindReport]:
    """Delete the VM's state of each kind from a device."""
    options = options or {}
    return {kind: kind_module(kind).forget(vm, namespace, **options.get(kind, {})) for kind in kinds}

