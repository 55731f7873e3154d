"""``xfer export|import|forget``, ``xfer bundle show``, ``xfer conntrack ls``: state on a device."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer

from xfer.cli.common import (
    JsonOpt,
    KeyOpt,
    KindsOpt,
    MarkOpt,
    MaskOpt,
    NetnsOpt,
    VmOpt,
    ZoneOpt,
    app,
    fail,
    print_json,
    progress,
)

# From this many entries an import on a terminal shows it is at work (~1 s and up).
LARGE_IMPORT = 100_000

bundle_app = typer.Typer(help="Inspect bundles.", no_args_is_help=True)
conntrack_app = typer.Typer(help="Look at a device's conntrack table.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
app.add_typer(conntrack_app, name="conntrack")
rules_app = typer.Typer(help="Look at the filter rules a VM's export would carry.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")


def _ct_options(zone: int | None, mark: int | None, mask: int) -> dict[str, Any]:
    from xfer.conntrack.transfer import Selectors

    return {"selectors": Selectors(zone, mark, mask)}


@app.command("export")
def export_cmd(
    vm: VmOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle file to write.")],
    kinds: KindsOpt = "conntrack",
    netns: NetnsOpt = None,
    zone: ZoneOpt = None,
    mark: MarkOpt = None,
    mask: MaskOpt = 0xFFFFFFFF,
    key_file: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a VM's state from a device into a bundle file.

    Example: xfer export --vm 10.0.0.2 --kinds conntrack --netns fw-src --out vm.xfer
    """
    from xfer import bundle as bundle_mod
    from xfer import transfer
    from xfer.model import Kind, parse_kinds, parse_vm

    ident = parse_vm(vm)
    kind_list = parse_kinds(kinds)
    options = {Kind.CONNTRACK: _ct_options(zone, mark, mask)}
    b = transfer.export_bundle(ident, kind_list, netns, options=options)
    size = bundle_mod.write(out, b, bundle_mod.load_key(key_file))
    counts = {k.value: s.count for k, s in b.sections.items()}
    if as_json:
        print_json({"file": str(out), "bytes": size, "id": b.id, "counts": counts})
    else:
        moved = ", ".join(f"{n} {k}" for k, n in counts.items())
        typer.echo(f"exported {moved} for {ident.id} to {out} ({size} bytes)")


@app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="Bundle file.")],
    netns: NetnsOpt = None,
    vm: Annotated[str | None, typer.Option("--vm", help="Refuse the bundle unless it is for "
                                           "this VM.")] = None,
    kinds: Annotated[str | None, typer.Option("--kinds", help="Import only these kinds.")] = None,
    no_replace: Annotated[bool, typer.Option("--no-replace", help="Skip (and count) entries that "
                                             "already exist instead of updating them.")] = False,
    partial: Annotated[bool, typer.Option("--partial", help="Keep what succeeded when some "
                                          "entries fail (default: roll back).")] = False,
    dev: Annotated[str | None, typer.Option("--dev", help="Counting interface that receives "
                                            "imported counters, where the device has several.",
                                            metavar="IFACE")] = None,
    key_file: KeyOpt = None,
    max_size: Annotated[int, typer.Option("--max-size", help="Refuse bundles larger than this "
                                          "many bytes.")] = 256 * 1024 * 1024,
    max_age: Annotated[float, typer.Option("--max-age", help="Refuse bundles exported more than "
                                           "this many seconds ago.", metavar="SECONDS")] = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Import a bundle into a device; prints created/updated/skipped/failed counts.

    Example: xfer import vm.xfer --netns fw-dst
    """
    from xfer import bundle as bundle_mod
    from xfer import transfer
    from xfer.model import Kind, parse_kinds, parse_vm

    b = bundle_mod.read(file, bundle_mod.load_key(key_file), max_size)
    ident = parse_vm(vm) if vm else None
    options: dict[Kind, dict[str, Any]] = {
        Kind.CONNTRACK: {"replace": not no_replace, "partial": partial}}
    if dev:
        options[Kind.COUNTERS] = {"dev": dev}
    entries = sum(section.count for section in b.sections.values())
    with progress(f"importing {entries} entries") if entries >= LARGE_IMPORT else nullcontext():
        report = transfer.import_bundle(b, netns, vm=ident, kinds=parse_kinds(kinds) if kinds else None,
                                        options=options, max_age_s=max_age)
    if as_json:
        print_json(report.to_dict())
    else:
        for kind, r in report.kinds.items():
            typer.echo(f"{kind}: created {r.created}, updated {r.updated}, skipped {r.skipped}, "
                       f"failed {r.failed} ({r.seconds * 1000:.1f} ms)"
                       + (" — rolled back" if r.rolled_back else ""))
            for w in r.warnings:
                typer.echo(f"  warning: {w}", err=True)
    if not report.ok:
        reasons = "; ".join(f"{k}: {m}" for k, m in report.errors.items()) or "some entries failed"
        fail(f"import failed: {reasons}")


@app.command("forget")
def forget_cmd(
    vm: VmOpt,
    kinds: KindsOpt = "conntrack",
    netns: NetnsOpt = None,
    zone: ZoneOpt = None,
    mark: MarkOpt = None,
    mask: MaskOpt = 0xFFFFFFFF,
    as_json: JsonOpt = False,
) -> None:
    """Delete a VM's state from a device (the source, once the destination committed).

    Example: xfer forget --vm 10.0.0.2 --netns fw-src
    """
    from xfer import transfer
    from xfer.model import Kind, parse_kinds, parse_vm

    reports = transfer.forget(parse_vm(vm), parse_kinds(kinds), netns,
                              options={Kind.CONNTRACK: _ct_options(zone, mark, mask)})
    if as_json:
        print_json({k.value: r.to_dict() for k, r in reports.items()})
    else:
        for kind, r in reports.items():
            typer.echo(f"{kind}: deleted {r.deleted}, already gone {r.skipped}, failed {r.failed}")
    if any(r.failed for r in reports.values()):
        fail("some entries could not be deleted")


@bundle_app.command("show")
def bundle_show(
    file: Annotated[Path, typer.Argument(help="Bundle file.")],
    entries: Annotated[bool, typer.Option("--entries", help="List every entry.")] = False,
    key_file: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a bundle's header, sections and (with --entries or --json) its entries.

    Example: xfer bundle show vm.xfer --json
    """
    from xfer import bundle as bundle_mod
    from xfer.conntrack.transfer import section_entries, verdict
    from xfer.model import Kind

    b = bundle_mod.read(file, bundle_mod.load_key(key_file))
    header = b.header()
    ct = b.sections.get(Kind.CONNTRACK)
    # read as an import reads them: a malformed entry fails the command (one line)
    records = section_entries(ct) if ct is not None and (entries or as_json) else []
    refused = verdict(ct, b.vm) if ct is not None else None
    if as_json:
        header["age_s"] = round(b.age(), 3)
        header["created_at"] = _date(b.created)
        header["import_check"] = refused or "ok"
        if ct is not None:
            header["conntrack"] = [e.to_json() for e in records]
        print_json(_without_none(header))
        return
    typer.echo(f"bundle {b.id} (format {header['format']}, {'signed' if b.signed else 'unsigned'})")
    typer.echo(f"  vm:      {b.vm.id}  {' '.join((*b.vm.addresses, *b.vm.macs))}")
    source = dict(_without_none(b.source))
    typer.echo(f"  source:  {source.pop('device', '?')}"
               + "".join(f" {k}={v}" for k, v in sorted(source.items())))
    typer.echo(f"  created: {_date(b.created)} ({b.age():.1f} s ago)")
    for s in header["sections"]:
        typer.echo(f"  section {s['kind']}: {s['count']} entries, {s['length']} bytes, "
                   f"{s['encoding']}, sha256 {s['sha256'][:16]}…")
        left_out = s["meta"].get("left_out")      # rules: what the export kept back, and why
        for reason, n in left_out.items() if isinstance(left_out, dict) else ():
            typer.echo(f"    left out: {n!r} ({reason[:80]!r})")
    if ct is not None:
        typer.echo(f"  import check: {refused or 'ok'}")
    if entries:
        for e in records:
            typer.echo("    " + e.summary())


def _date(ts: float) -> str:
    """A Unix time as people and scripts read it: ISO 8601, UTC, to the millisecond.

    >>> _date(0.5)
    '1970-01-01T00:00:00.500+00:00'
    """
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")


def _without_none(value: Any) -> Any:
    """``value`` with every None-valued key left out, at every depth."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


@conntrack_app.command("ls")
def conntrack_ls(
    vm: Annotated[str | None, typer.Option("--vm", help="Only this VM's entries.")] = None,
    netns: NetnsOpt = None,
    zone: ZoneOpt = None,
    mark: MarkOpt = None,
    mask: MaskOpt = 0xFFFFFFFF,
    as_json: JsonOpt = False,
) -> None:
    """List conntrack entries of a VM (both directions, NAT included).

    Example: xfer conntrack ls --vm 10.0.0.2 --netns fw-src --json
    """
    from xfer.conntrack.transfer import Selectors, list_entries
    from xfer.model import parse_vm

    records = list_entries(parse_vm(vm) if vm else None, netns, Selectors(zone, mark, mask))
    if as_json:
        print_json([e.to_json() for e in records])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("proto", "state", "original", "reply", "timeout", "mark", "zone", "flags",
                  box=None)
    for e in records:
        o, r = e.orig, e.reply
        table.add_row(
            o.to_json()["proto"], e.state or "",
            f"{o.src}:{o.sport or o.icmp_id or ''} → {o.dst}:{o.dport or ''}",
            f"{r.src}:{r.sport or r.icmp_id or ''} → {r.dst}:{r.dport or ''}",
            str(e.timeout), str(e.mark), str(e.zone),
            ",".join(n for n in e.status_names() if n in ("ASSURED", "SRC_NAT", "DST_NAT")),
        )
    Console().print(table)
    typer.echo(f"{len(records)} entries", err=True)


@rules_app.command("ls")
def rules_ls(
    vm: Annotated[str, typer.Option("--vm", help="The VM's addresses (IPv4, IPv6, MAC) or name.")],
    netns: NetnsOpt = None,
    backend: Annotated[str, typer.Option("--backend", help="auto, nft or iptables.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Show the rules, chains and set elements an export would carry for a VM, and what it
    would leave out and why (see docs/rules.md).

    Example: xfer rules ls --vm 10.0.1.2,fd00:1::2 --netns fw-src --json
    """
    from xfer.model import parse_vm
    from xfer.rules.transfer import show

    found = show(parse_vm(vm), netns, backend)
    if as_json:
        print_json(found)
        return
    for backend_name in ("nft", "iptables"):
        for r in found.get(backend_name, {}).get("rules", []):
            where = f"{r['family']} {r['table']} {r['chain']}"
            typer.echo(f"{backend_name:8} {where:28} {r.get('expr', r.get('rule'))}")
    typer.echo(f"{found['rules']} rules, {found['chains']} chains, {found['elements']} set elements",
               err=True)
    for reason, n in found["left_out"].items():
        typer.echo(f"left out: {n} ({reason})", err=True)
