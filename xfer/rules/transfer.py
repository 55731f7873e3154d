"""Export, import and forget a VM's static filter rules (the ``rules`` kind).

A section carries one part per backend the source uses: ``nft`` (libnftables
JSON) and ``iptables`` (iptables-legacy through python-iptables). The meta says
how many rules, chains and set elements travel and what was left out, and why
(``left_out``: reason → count). See docs/rules.md for which rules are the VM's.

Import checks the whole section before touching anything: one rule that is not
provably the VM's refuses the bundle. It is idempotent (what is already there is
skipped), and each backend's change is one transaction.

    section = export_section(parse_vm("10.0.1.2"), "fw-a")
    import_section(section, bundle, "fw-b")     # fw-b now lets in what fw-a let in for the VM
"""

from __future__ import annotations

import json
import time
from typing import Any

from xfer.bundle import Bundle, Section
from xfer.errors import BundleError, ImportFailed, UsageError, XferError
from xfer.model import Kind, KindReport, VmIdentity
from xfer.netns import entered
from xfer.rules import iptrules, nftrules
from xfer.rules.model import ENCODING, MAX_RULES, load_strict, need_keys

BACKENDS = ("nft", "iptables")


def _backends(backend: str) -> tuple[str, ...]:
    if backend == "auto":
        return BACKENDS
    if backend not in BACKENDS:
        raise UsageError(f"rules backend {backend!r} is not one of auto, nft, iptables")
    return (backend,)


def _nft_available() -> bool:
    try:
        import nftables  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _uses_legacy(namespace: str | None) -> bool:
    from xfer.rules.ipt import legacy_tables

    with entered(namespace):
        return any("filter" in legacy_tables(f) for f in (4, 6))


def _export(vm: VmIdentity, namespace: str | None, backend: str
            ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    parts: dict[str, Any] = {}
    left_out: dict[str, int] = {}
    doomed: dict[str, Any] = {}
    wanted = _backends(backend)
    if "nft" in wanted and (backend == "nft" or _nft_available()):
        from xfer.rules import nft

        parts["nft"], lo, doomed["nft"] = nftrules.export_part(nft.list_ruleset(namespace), vm)
        left_out.update({f"nft: {k}": v for k, v in lo.items()})
    if "iptables" in wanted and (backend == "iptables" or _uses_legacy(namespace)):
        from xfer.rules import ipt

        parts["iptables"], lo, doomed["iptables"] = iptrules.export_part(ipt.read(namespace), vm)
        left_out.update({f"iptables: {k}": v for k, v in lo.items()})
    if not parts:
        # Neither backend could look: say so rather than export "no rules".
        raise UsageError("no rules backend here: install python3-nftables (nftables) or use "
                         "iptables-legacy with python3-iptables")
    return parts, left_out, doomed


def _counts(parts: dict[str, Any]) -> dict[str, int]:
    rules = sum(len(p["rules"]) for p in parts.values())
    chains = sum(sum(1 for c in p["chains"] if c["vm"]) for p in parts.values())
    elements = sum(len(s["elem"]) for s in parts.get("nft", {}).get("elements", []))
    return {"rules": rules, "chains": chains, "elements": elements}


def export_section(vm: VmIdentity, namespace: str | None = None, *, backend: str = "auto",
                   **_: object) -> Section:
    """The VM's rules on the device as a bundle section (count: rules + set elements).

    >>> export_section(parse_vm("10.0.1.2"), "fw-a").meta["left_out"]  # doctest: +SKIP
    {'nft: matches a whole prefix holding the VM': 1}
    """
    parts, left_out, _ = _export(vm, namespace, backend)
    counts = _counts(parts)
    payload = json.dumps(parts, separators=(",", ":"), sort_keys=True).encode()
    meta = {"backends": sorted(parts), **counts, "left_out": _bounded(left_out)}
    return Section(Kind.RULES, ENCODING, counts["rules"] + counts["elements"], payload, meta)


def _bounded(left_out: dict[str, int], most: int = 32) -> dict[str, int]:
    """The ``most`` commonest reasons; the rest summed, so the meta stays small in any ruleset."""
    ranked = sorted(left_out.items(), key=lambda kv: (-kv[1], kv[0]))
    out = dict(ranked[:most])
    rest = sum(n for _, n in ranked[most:])
    if rest:
        out["other reasons"] = rest
    return out


def section_parts(section: Section, vm: VmIdentity) -> dict[str, Any]:
    """Decode and check a section strictly; BundleError / ForeignEntryError on any defect."""
    if section.encoding != ENCODING:
        raise BundleError(f"rules section encoding {section.encoding!r} is not supported")
    if not 0 <= section.count <= 2 * MAX_RULES:
        raise BundleError(f"rules section claims {section.count} entries, over {2 * MAX_RULES}")
    raw = load_strict(section.payload)
    parts = need_keys(raw, (), BACKENDS, "rules section")
    checked: dict[str, Any] = {}
    if "nft" in parts:
        checked["nft"] = nftrules.check_part(parts["nft"], vm)
    if "iptables" in parts:
        checked["iptables"] = iptrules.check_part(parts["iptables"], vm)
    counts = _counts(checked)
    if counts["rules"] + counts["elements"] != section.count:
        raise BundleError(f"rules section holds {counts['rules'] + counts['elements']} entries, "
                          f"header says {section.count}")
    return checked


def import_section(section: Section, bundle: Bundle, namespace: str | None = None, *,
                   vm: VmIdentity | None = None, **_: object) -> KindReport:
    """Install the bundle's rules for its VM: all or nothing, idempotent.

    Every rule must be the VM's (ForeignEntryError before anything changes, see
    docs/rules.md). Tables, chains and sets missing here are created; rules go
    where the source had them relative to their neighbours.
    """
    started = time.perf_counter()
    report = KindReport(Kind.RULES)
    owner = vm or bundle.vm
    parts = section_parts(section, owner)
    nft_plan = ipt_plan = None
    if "nft" in parts:
        from xfer.rules import nft

        tables = [(t["family"], t["name"]) for t in parts["nft"]["tables"]]
        nft_plan = nftrules.import_plan(parts["nft"], nft.list_ruleset(namespace, tables), owner)
    if "iptables" in parts:
        from xfer.rules import ipt

        ipt_plan = iptrules.import_plan(parts["iptables"], ipt.read(namespace), owner)
    for plan in (nft_plan, ipt_plan):
        if plan is not None:
            report.created += plan.created
            report.skipped += plan.skipped
            report.warnings += plan.warnings
    nft_done = False
    try:
        if nft_plan is not None and nft_plan.commands:
            nft.apply(nft_plan.commands, namespace)
            nft_done = True
        if ipt_plan is not None and ipt_plan.ops:
            ipt.apply(ipt_plan.ops, namespace)
    except XferError as exc:
        if nft_done and nft_plan is not None:
            _undo_nft(parts["nft"], nft_plan, namespace)
        taken = getattr(exc, "committed", ())
        if ipt_plan is not None and taken:
            ipt.apply([op for op in ipt_plan.undo if op[1] in taken], namespace)
        report.failed, report.created = report.created, 0
        report.rolled_back = True
        report.errors.append(str(exc))
        report.seconds = time.perf_counter() - started
        raise ImportFailed(f"rules import failed ({exc}); rolled back", report) from None
    report.seconds = time.perf_counter() - started
    return report


def _undo_nft(part: dict[str, Any], plan: nftrules.Plan, namespace: str | None) -> None:
    """Take back an applied nft plan (the iptables half failed), one command at a time.

    One at a time so that a command with nothing left to delete (a bundle may carry the
    same element twice) does not stop the others.
    """
    from xfer.rules import nft

    tables = [(t["family"], t["name"]) for t in part["tables"]]
    for command in nftrules.delete_rules(part, nft.list_ruleset(namespace, tables)) + plan.undo:
        try:
            nft.apply([command], namespace)
        except nft.NftError:
            continue


def forget(vm: VmIdentity, namespace: str | None = None, *, backend: str = "auto",
           **_: object) -> KindReport:
    """Delete the VM's rules, chains and set elements (what an export would carry) here."""
    started = time.perf_counter()
    report = KindReport(Kind.RULES)
    parts, _, doomed = _export(vm, namespace, backend)
    if doomed.get("nft"):
        from xfer.rules import nft

        nft.apply(doomed["nft"], namespace)
    if doomed.get("iptables"):
        from xfer.rules import ipt

        ipt.apply(doomed["iptables"], namespace)
    counts = _counts(parts)
    report.deleted = counts["rules"] + counts["elements"]
    report.seconds = time.perf_counter() - started
    return report


def show(vm: VmIdentity, namespace: str | None = None, backend: str = "auto") -> dict[str, Any]:
    """What an export would carry and leave out, without a bundle (``xfer rules ls``)."""
    parts, left_out, _ = _export(vm, namespace, backend)
    return {**parts, **_counts(parts), "left_out": left_out}


def count_rules(namespace: str | None = None) -> int:
    """Filter rules on the device, every backend it uses (``xfer agent status``)."""
    total = 0
    if _nft_available():
        from xfer.rules import nft

        total += sum(1 for o in nft.list_ruleset(namespace) if "rule" in o)
    if _uses_legacy(namespace):
        from xfer.rules import ipt

        total += sum(len(c.rules) for c in ipt.read(namespace).values())
    return total
