"""The ``xfer`` command: parse, call the library, print. Nothing is implemented here.

Exit status: 0 success, 1 the operation failed (one-line reason on stderr), 2 usage.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from xfer import heap
from xfer.errors import UsageError, XferError

app = typer.Typer(
    name="xfer",
    help="Move a live-migrating VM's network state (conntrack, DHCP bindings, counters) "
         "between Linux firewalls inside the migration's pause window.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    # With a callback the app stays a group even when main() leaves it one command.
    pass


bundle_app = typer.Typer(help="Inspect bundles.", no_args_is_help=True)
conntrack_app = typer.Typer(help="Look at a device's conntrack table.", no_args_is_help=True)
lab_app = typer.Typer(help="The network-namespace lab: two firewalls, a VM and a server.",
                      no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks against the baseline tools, measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
app.add_typer(conntrack_app, name="conntrack")
app.add_typer(lab_app, name="lab")
app.add_typer(bench_app, name="bench")
agent_app = typer.Typer(help="The device agent: serve, and drive agents over mutual TLS.",
                        no_args_is_help=True)
pki_app = typer.Typer(help="A small CA and per-device certificates for agents (labs, small sites).",
                      no_args_is_help=True)
app.add_typer(agent_app, name="agent")
app.add_typer(pki_app, name="pki")
counters_app = typer.Typer(help="Per-VM packet, byte and TCP connection counters (eBPF on the "
                                "device's VM-facing interface).", no_args_is_help=True)
app.add_typer(counters_app, name="counters")
dhcp_app = typer.Typer(help="DHCP snooping, IP source guard and ARP inspection (eBPF).",
                       no_args_is_help=True)
app.add_typer(dhcp_app, name="dhcp")

NetnsOpt = Annotated[str | None, typer.Option("--netns", help="Network namespace of the device "
                                              "(default: the current one).", metavar="NS")]
VmOpt = Annotated[str, typer.Option("--vm", help="VM addresses (IPv4, IPv6, MAC; comma-separated) "
                                    "or an inventory name.", metavar="ADDR[,ADDR...]")]
KindsOpt = Annotated[str, typer.Option("--kinds", help="Kinds of state: conntrack,dhcp,counters.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ZoneOpt = Annotated[int | None, typer.Option("--zone", help="Only this conntrack zone.")]
MarkOpt = Annotated[int | None, typer.Option("--mark", help="Only entries whose mark & MASK == MARK.")]
MaskOpt = Annotated[int, typer.Option("--mask", help="Mask for --mark.")]
KeyOpt = Annotated[Path | None, typer.Option("--key-file", help="HMAC key to sign/verify bundles "
                                             "(default: $XFER_BUNDLE_KEY_FILE).")]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"xfer: {message}\n")
    raise SystemExit(code)


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
        _print_json({"file": str(out), "bytes": size, "id": b.id, "counts": counts})
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
    report = transfer.import_bundle(b, netns, vm=ident,
                                    kinds=parse_kinds(kinds) if kinds else None, options=options)
    if as_json:
        _print_json(report.to_dict())
    else:
        for kind, r in report.kinds.items():
            typer.echo(f"{kind}: created {r.created}, updated {r.updated}, skipped {r.skipped}, "
                       f"failed {r.failed} ({r.seconds * 1000:.1f} ms)"
                       + (" — rolled back" if r.rolled_back else ""))
            for w in r.warnings:
                typer.echo(f"  warning: {w}", err=True)
    if not report.ok:
        reasons = "; ".join(f"{k}: {m}" for k, m in report.errors.items()) or "some entries failed"
        _fail(f"import failed: {reasons}")


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
        _print_json({k.value: r.to_dict() for k, r in reports.items()})
    else:
        for kind, r in reports.items():
            typer.echo(f"{kind}: deleted {r.deleted}, already gone {r.skipped}, failed {r.failed}")
    if any(r.failed for r in reports.values()):
        _fail("some entries could not be deleted")


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
    from xfer.conntrack.transfer import section_entries
    from xfer.model import Kind

    b = bundle_mod.read(file, bundle_mod.load_key(key_file))
    header = b.header()
    ct = b.sections.get(Kind.CONNTRACK)
    records = section_entries(ct) if ct is not None else []
    if as_json:
        header["age_s"] = round(b.age(), 3)
        if ct is not None:
            header["conntrack"] = [e.to_json() for e in records]
        _print_json(header)
        return
    typer.echo(f"bundle {b.id} (format {header['format']}, {'signed' if b.signed else 'unsigned'})")
    typer.echo(f"  vm:      {b.vm.id}  {' '.join((*b.vm.addresses, *b.vm.macs))}")
    typer.echo(f"  source:  {b.source.get('device')} netns={b.source.get('netns')}")
    typer.echo(f"  created: {b.created:.3f} ({b.age():.1f} s ago)")
    for s in header["sections"]:
        typer.echo(f"  section {s['kind']}: {s['count']} entries, {s['length']} bytes, "
                   f"{s['encoding']}, sha256 {s['sha256'][:16]}…")
    if entries:
        for e in records:
            typer.echo("    " + e.summary())


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
        _print_json([e.to_json() for e in records])
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


@lab_app.command("up")
def lab_up(
    prefix: Annotated[str, typer.Option(help="Namespace name prefix.")] = "xfer",
) -> None:
    """Build the lab: VM, source firewall, destination firewall and server namespaces.

    Example: xfer lab up && ip netns exec xfer-vm ping -c1 10.0.2.2
    """
    from xfer.lab import topology

    lab = topology.Lab(prefix)
    lab.up()
    typer.echo(lab.describe())


@lab_app.command("down")
def lab_down(prefix: Annotated[str, typer.Option(help="Namespace name prefix.")] = "xfer") -> None:
    """Remove every namespace and process of the lab."""
    from xfer.lab import topology

    topology.Lab(prefix).down()
    typer.echo("lab removed")


@lab_app.command("demo")
def lab_demo(
    prefix: Annotated[str, typer.Option(help="Namespace name prefix.")] = "xfer",
    as_json: JsonOpt = False,
) -> None:
    """Migrate the lab VM with a live TCP conversation, then the control without transfer.

    Example: xfer lab demo
    """
    from xfer.lab import demo

    result = demo.run(prefix, echo=None if as_json else typer.echo)
    if as_json:
        _print_json(result)
    if not result["ok"]:
        _fail("demo failed: " + result["reason"])


@bench_app.command("conntrack")
def bench_conntrack(
    total: Annotated[int, typer.Option(help="Entries in the source table.")] = 200_000,
    vm_flows: Annotated[int, typer.Option("--vm-flows", help="Of which the VM's.")] = 20_000,
    repeat: Annotated[int, typer.Option(help="Runs of each contender (median reported).")] = 3,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/conntrack.json"),
    as_json: JsonOpt = False,
) -> None:
    """Export+import of a VM's conntrack entries vs `conntrack -L ... -o save | conntrack -R -`.

    Example: xfer bench conntrack --total 200000 --vm-flows 20000
    """
    from xfer.bench import conntrack as bench

    result = bench.run(total, vm_flows, repeat, out, echo=None if as_json else typer.echo)
    if as_json:
        _print_json(result)


@bench_app.command("agents")
def bench_agents(
    vm_flows: Annotated[int, typer.Option("--vm-flows", help="The VM's conntrack entries.")] = 20_000,
    total: Annotated[int, typer.Option(help="Entries in the source table.")] = 20_000,
    repeat: Annotated[int, typer.Option(help="Rounds after the cold one (median reported).")] = 5,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/agents.json"),
    as_json: JsonOpt = False,
) -> None:
    """Push and pull between two agents (mutual TLS) vs in-process export+import, same run.

    Example: xfer bench agents --vm-flows 20000 --json
    """
    from xfer.bench import agents as bench

    result = bench.run(vm_flows, max(total, vm_flows), repeat, out, echo=None if as_json else typer.echo)
    if as_json:
        _print_json(result)


# --- agent -------------------------------------------------------------------------------

AgentOpt = Annotated[str, typer.Option("--agent", help="The agent to ask: https://HOST:PORT.",
                                       envvar="XFER_AGENT")]
CaOpt = Annotated[Path, typer.Option("--ca", help="CA certificate the agent's must be signed by.",
                                     envvar="XFER_AGENT_CA")]
CertOpt = Annotated[Path | None, typer.Option("--cert", help="Client certificate (agents refuse "
                                              "clients without one).", envvar="XFER_AGENT_CERT")]
CertKeyOpt = Annotated[Path | None, typer.Option("--key", help="Key of --cert.",
                                                 envvar="XFER_AGENT_KEY")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the agent.")]


def _agent_run(ca: Path, cert: Path | None, key: Path | None, timeout: float, op: Any) -> Any:
    from xfer.agent import client, tls

    return client.run_sync(tls.client_context(ca, cert, key), op, timeout)


def _print_report(report: dict[str, Any]) -> None:
    for kind, r in report.get("kinds", {}).items():
        if "created" in r:
            typer.echo(f"{kind}: created {r['created']}, updated {r['updated']}, skipped {r['skipped']}, "
                       f"failed {r['failed']} ({r['seconds'] * 1000:.1f} ms)"
                       + (" — rolled back" if r.get("rolled_back") else ""))
        if "error" in r:
            typer.echo(f"{kind}: {r['error']}", err=True)


def _report_failed(report: dict[str, Any]) -> bool:
    return bool(report.get("failed")) or any("error" in r for r in report.get("kinds", {}).values())


@agent_app.command("serve")
def agent_serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="Agent configuration (TOML).")],
) -> None:
    """Run the agent of one device until SIGTERM (logs one JSON line per request on stderr).

    Example: xfer agent serve --config /etc/xfer/agent.toml
    """
    import asyncio

    from xfer.agent import config as config_mod
    from xfer.agent import server

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    agent_log = logging.getLogger("xfer.agent")
    agent_log.addHandler(handler)
    agent_log.setLevel(logging.INFO)
    agent_log.propagate = False
    asyncio.run(server.serve(config_mod.load(config)))


@agent_app.command("status")
def agent_status(agent: AgentOpt, ca: CaOpt, cert: CertOpt = None, key: CertKeyOpt = None,
                 timeout: TimeoutOpt = 30, as_json: JsonOpt = False) -> None:
    """Show a device's type, kinds, per-kind counts and unfinished imports.

    Example: xfer agent status --agent https://10.0.4.1:7443 --ca ca.pem --cert op.pem --key op.key
    """
    result = _agent_run(ca, cert, key, timeout, lambda c: c.status(agent))
    if as_json:
        _print_json(result)
        return
    typer.echo(f"device {result['device']} ({result['type']}) netns={result.get('netns')}")
    for kind, n in result.get("counts", {}).items():
        typer.echo(f"  {kind}: {n if n is not None else '?'}")
    for item in result.get("unfinished_imports", []):
        typer.echo(f"  unfinished import {item['bundle']} of {item['kinds']}", err=True)


@agent_app.command("export")
def agent_export(agent: AgentOpt, vm: VmOpt, ca: CaOpt,
                 out: Annotated[Path, typer.Option("--out", "-o", help="Bundle file to write.")],
                 kinds: KindsOpt = "conntrack", cert: CertOpt = None, key: CertKeyOpt = None,
                 timeout: TimeoutOpt = 120, as_json: JsonOpt = False) -> None:
    """Ask an agent for a VM's state; write the bundle to a file.

    Example: xfer agent export --agent https://10.0.4.1:7443 --vm 10.0.1.2 --out vm.xfer --ca ca.pem
    --cert op.pem --key op.key
    """
    from xfer.model import parse_kinds, parse_vm

    ident, kind_list = parse_vm(vm), parse_kinds(kinds)
    data: bytes = _agent_run(ca, cert, key, timeout, lambda c: c.export(agent, ident, kind_list))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    if as_json:
        _print_json({"file": str(out), "bytes": len(data)})
    else:
        typer.echo(f"exported {len(data)} bytes from {agent} to {out}")


@agent_app.command("import")
def agent_import(file: Annotated[Path, typer.Argument(help="Bundle file.")], agent: AgentOpt, vm: VmOpt,
                 ca: CaOpt, kinds: Annotated[str | None, typer.Option("--kinds", help="Import only "
                                                                      "these kinds.")] = None,
                 cert: CertOpt = None, key: CertKeyOpt = None, timeout: TimeoutOpt = 120,
                 as_json: JsonOpt = False) -> None:
    """Send a bundle to an agent; it imports it only if it is the named VM's.

    Example: xfer agent import vm.xfer --agent https://10.0.4.2:7443 --vm 10.0.1.2 --ca ca.pem
    --cert op.pem --key op.key
    """
    from xfer.model import parse_kinds, parse_vm

    ident = parse_vm(vm)
    kind_list = parse_kinds(kinds) if kinds else None
    try:
        data = file.read_bytes()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror}")
    report = _agent_run(ca, cert, key, timeout, lambda c: c.import_(agent, data, ident, kind_list))
    _print_json(report) if as_json else _print_report(report)
    if _report_failed(report):
        _fail("import failed at the agent (see the report)")


@agent_app.command("forget")
def agent_forget(agent: AgentOpt, vm: VmOpt, ca: CaOpt, kinds: KindsOpt = "conntrack",
                 cert: CertOpt = None, key: CertKeyOpt = None, timeout: TimeoutOpt = 120,
                 as_json: JsonOpt = False) -> None:
    """Ask an agent to delete a VM's state (the source, once the destination committed).

    Example: xfer agent forget --agent https://10.0.4.1:7443 --vm 10.0.1.2 --ca ca.pem
    --cert op.pem --key op.key
    """
    from xfer.model import parse_kinds, parse_vm

    ident, kind_list = parse_vm(vm), parse_kinds(kinds)
    reports = _agent_run(ca, cert, key, timeout, lambda c: c.forget(agent, ident, kind_list))
    if as_json:
        _print_json(reports)
    else:
        for kind, r in reports.items():
            typer.echo(f"{kind}: deleted {r['deleted']}, already gone {r['skipped']}, failed {r['failed']}")
    if any(r.get("failed") for r in reports.values()):
        _fail("some entries could not be deleted")


@agent_app.command("push")
def agent_push(agent: AgentOpt, vm: VmOpt, ca: CaOpt,
               to: Annotated[str, typer.Option("--to", help="Destination agent URL.")],
               kinds: KindsOpt = "conntrack", cert: CertOpt = None, key: CertKeyOpt = None,
               timeout: TimeoutOpt = 120, as_json: JsonOpt = False) -> None:
    """Ask the source agent to send a VM's state straight to the destination agent.

    The source keeps its state (forget it once the VM runs at the destination).

    Example: xfer agent push --agent https://10.0.4.1:7443 --to https://10.0.4.2:7443 --vm 10.0.1.2
    --ca ca.pem --cert op.pem --key op.key
    """
    from xfer.agent.protocol import check_agent_url
    from xfer.model import parse_kinds, parse_vm

    ident, kind_list, to = parse_vm(vm), parse_kinds(kinds), check_agent_url(to)
    result = _agent_run(ca, cert, key, timeout, lambda c: c.push(agent, ident, kind_list, to))
    if as_json:
        _print_json(result)
    else:
        typer.echo(f"pushed {result['bytes']} bytes to {result['destination']}")
        _print_report(result["report"])
    if not result.get("ok"):
        _fail("push failed at the destination (see the report)")


@agent_app.command("pull")
def agent_pull(agent: AgentOpt, vm: VmOpt, ca: CaOpt,
               source: Annotated[str, typer.Option("--from", help="Source agent URL.")],
               kinds: KindsOpt = "conntrack", cert: CertOpt = None, key: CertKeyOpt = None,
               timeout: TimeoutOpt = 120, as_json: JsonOpt = False) -> None:
    """Ask the destination agent to fetch a VM's state straight from the source agent.

    Example: xfer agent pull --agent https://10.0.4.2:7443 --from https://10.0.4.1:7443 --vm 10.0.1.2
    --ca ca.pem --cert op.pem --key op.key
    """
    from xfer.agent.protocol import check_agent_url
    from xfer.model import parse_kinds, parse_vm

    ident, kind_list, source = parse_vm(vm), parse_kinds(kinds), check_agent_url(source)
    report = _agent_run(ca, cert, key, timeout, lambda c: c.pull(agent, ident, kind_list, source))
    _print_json(report) if as_json else _print_report(report)
    if _report_failed(report):
        _fail("pull failed (see the report)")


# --- pki ---------------------------------------------------------------------------------

PkiDirOpt = Annotated[Path, typer.Option("--dir", help="Directory of the CA and certificates.")]


@pki_app.command("init")
def pki_init(directory: PkiDirOpt,
             name: Annotated[str, typer.Option("--name", help="CA common name.")] = "xfer CA",
             days: Annotated[int, typer.Option(help="Validity in days.")] = 3650,
             force: Annotated[bool, typer.Option("--force", help="Replace an existing CA.")] = False,
             ) -> None:
    """Create a CA (ca.pem, ca.key) for the agents of a lab or small site.

    Example: xfer pki init --dir /etc/xfer/pki
    """
    from xfer import pki

    typer.echo(f"CA certificate {pki.init_ca(directory, name, days, force)}")


@pki_app.command("issue")
def pki_issue(name: Annotated[str, typer.Argument(help="Device (or operator) name: the "
                                                  "certificate's common name.")],
              directory: PkiDirOpt,
              ip: Annotated[list[str] | None, typer.Option("--ip", help="An address the device is "
                                                           "reached at (repeat).")] = None,
              dns: Annotated[list[str] | None, typer.Option("--dns", help="Another DNS name "
                                                            "(repeat).")] = None,
              days: Annotated[int, typer.Option(help="Validity in days.")] = 825) -> None:
    """Issue NAME.pem and NAME.key signed by the CA in --dir (good as server and client).

    Example: xfer pki issue fw-src --dir /etc/xfer/pki --ip 10.0.4.1
    """
    from xfer import pki

    cert, key = pki.issue(directory, name, ip or [], dns or [], days)
    typer.echo(f"certificate {cert}, key {key}")


DevOpt = Annotated[str, typer.Option("--dev", help="The device's VM-facing interface.",
                                     metavar="IFACE")]


@counters_app.command("attach")
def counters_attach(
    dev: Annotated[str | None, typer.Option("--dev", help="The device's VM-facing interface "
                                            "(required unless --ebpf).", metavar="IFACE")] = None,
    netns: NetnsOpt = None,
    ebpf: Annotated[bool, typer.Option("--ebpf", help="Print the BPF program and exit.")] = False,
) -> None:
    """Count per VM (MAC, IP) on an interface; idempotent. Counts persist in pinned maps.

    Ingress frames are what the VMs send (tx), egress what they receive (rx).

    Example: xfer counters attach --dev vmif --netns fw-src
    """
    if ebpf:
        from xfer.ebpf import loader
        from xfer.ebpf.counters_device import PROGRAM

        sys.stdout.write(loader.source_text(PROGRAM))
        return
    if not dev:
        raise UsageError("--dev IFACE is required (the device's VM-facing interface)")
    from xfer.ebpf import counters_device

    pins = counters_device.attach(dev, netns)
    typer.echo(f"counting on {dev} (maps pinned in {pins})")


@counters_app.command("detach")
def counters_detach(
    dev: DevOpt,
    netns: NetnsOpt = None,
    unpin: Annotated[bool, typer.Option("--unpin", help="Also remove the pinned maps: the "
                                        "counts are lost.")] = False,
) -> None:
    """Stop counting on an interface; the counts stay pinned (re-attach resumes them).

    Example: xfer counters detach --dev vmif --netns fw-src
    """
    from xfer.ebpf import counters_device

    removed = counters_device.detach(dev, netns, unpin=unpin)
    typer.echo(f"removed {removed} filter(s) from {dev}" + ("; maps unpinned" if unpin else ""))


@counters_app.command("show")
def counters_show(
    vm: Annotated[str | None, typer.Option("--vm", help="Only this VM's counters.")] = None,
    netns: NetnsOpt = None,
    dev: Annotated[str | None, typer.Option("--dev", help="Only this interface (default: "
                                            "the sum over all counting interfaces).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print per-(MAC, IP) totals: counted here plus carried in by imports.

    Example: xfer counters show --vm 10.0.0.2 --netns fw-dst --json
    """
    from xfer.ebpf import counters, counters_transfer
    from xfer.model import parse_vm

    rows = counters.rows(counters_transfer.show(parse_vm(vm) if vm else None, netns, dev=dev))
    if as_json:
        _print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("mac", "ip", *counters.FIELDS, box=None)
    for r in rows:
        table.add_row(r["mac"], r["ip"], *(str(r[f]) for f in counters.FIELDS))
    Console().print(table)


@bench_app.command("counters")
def bench_counters(
    vms: Annotated[int, typer.Option("--vms", help="VMs whose counters move in bulk.")] = 10_000,
    repeat: Annotated[int, typer.Option(help="Runs of each contender (median reported).")] = 5,
    seconds: Annotated[float, typer.Option(help="Length of each iperf3 run.")] = 3.0,
    keys_per_vm: Annotated[int, typer.Option("--keys-per-vm", help="2: IPv4 + IPv6 per VM; "
                                             "1: IPv4 only.")] = 2,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/counters.json"),
    datapath: Annotated[bool, typer.Option("--datapath/--no-datapath",
                                           help="Also measure the datapath cost with iperf3.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Counters export+import (batch vs per key) and datapath cost (iperf3 with vs without).

    Example: xfer bench counters --vms 10000 --json
    """
    from xfer.bench import counters as bench

    result = bench.run(vms, repeat, seconds, out, echo=None if as_json else typer.echo,
                       keys_per_vm=keys_per_vm, datapath=datapath)
    if as_json:
        _print_json(result)


@bench_app.command("qemu")
def bench_qemu(
    repeat: Annotated[int, typer.Option(help="Migrations of each contender (median reported).")] = 10,
    transfer_ms: Annotated[float, typer.Option("--transfer-ms", help="Time the stand-in manager "
                                               "takes in the second hooked scenario.")] = 50.0,
    memory_mb: Annotated[int, typer.Option("--memory-mb", help="Guest memory.")] = 64,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/qemu.json"),
    as_json: JsonOpt = False,
) -> None:
    """Extra guest downtime the QEMU hook causes (window held minus the transfer), real QEMU.

    Baseline: the same migration without the hook, in the same run. Target: under 5 ms.

    Example: xfer bench qemu --repeat 10 --json
    """
    from xfer.bench import qemu as bench

    result = bench.run(repeat, transfer_ms, out, echo=None if as_json else typer.echo,
                       memory_mb=memory_mb)
    if as_json:
        _print_json(result)


@bench_app.command("dhcp")
def bench_dhcp(
    repeat: Annotated[int, typer.Option(help="Runs of each measurement (median reported).")] = 20,
    seconds: Annotated[float, typer.Option(help="Seconds per iperf3 run.")] = 3.0,
    rounds: Annotated[int, typer.Option(help="iperf3 on/off rounds per traffic kind.")] = 4,
    out: Annotated[Path, typer.Option(help="Results file.")] = Path("bench/results/dhcp.json"),
    as_json: JsonOpt = False,
) -> None:
    """ACK-to-enforceable latency, export+import of one binding, iperf3 with guard on vs off.

    Example: xfer bench dhcp --json
    """
    from xfer.bench import dhcp as bench

    result = bench.run(repeat, seconds, out, echo=None if as_json else typer.echo,
                       rounds=rounds)
    if as_json:
        _print_json(result)


QmpSockOpt = Annotated[str, typer.Option("--qmp", help="The source QEMU's QMP unix socket.",
                                          metavar="SOCKET")]
VmIdOpt = Annotated[str, typer.Option("--vm", help="VM id, as the manager knows it.", metavar="VM")]
ManagerOpt = Annotated[str, typer.Option("--manager", help="Manager URL the migration message is "
                                         "POSTed to.", metavar="URL")]
FromOpt = Annotated[str | None, typer.Option("--from", help="Source server (default: this host's "
                                             "name).", metavar="S")]
ToOpt = Annotated[str, typer.Option("--to", help="Destination server.", metavar="D")]
DeadlineOpt = Annotated[int, typer.Option("--deadline-ms", help="Longest the guest may stay paused "
                                          "for the state, counted from the window opening.")]
OnFailOpt = Annotated[str, typer.Option("--on-fail", help="cancel: cancel the migration, the guest "
                                        "runs on at the source; continue: let the VM move without "
                                        "its state.", metavar="cancel|continue")]
MsgKindsOpt = Annotated[str | None, typer.Option("--kinds", help="Kinds to move (default: the "
                                                 "manager's choice).")]
ModeOpt = Annotated[str | None, typer.Option("--mode", help="relay|pull|push|store (default: the "
                                             "manager's).")]
ManagerCaOpt = Annotated[Path | None, typer.Option("--cacert", help="CA that signs an https manager's "
                                            "certificate (default: the system's).", metavar="FILE")]
ManagerCertOpt = Annotated[Path | None, typer.Option("--cert", help="Client certificate for a manager that "
                                              "wants mutual TLS.", metavar="FILE")]
ManagerKeyOpt = Annotated[Path | None, typer.Option("--key", help="Key of --cert (default: in --cert).",
                                                 metavar="FILE")]


def _hook_options(vm: str, manager: str, source: str | None, destination: str, deadline_ms: int,
                  on_fail: str, kinds: str | None, mode: str | None, tls: tuple[Path | None, ...],
                  **kw: Any) -> Any:
    from xfer.hypervisor.hook import HookOptions
    from xfer.hypervisor.notify import client_tls
    from xfer.model import parse_kinds

    extra: dict[str, Any] = {"source": source} if source else {}
    return HookOptions(vm=vm, manager=manager, destination=destination, deadline_s=deadline_ms / 1000,
                       on_fail=on_fail, kinds=tuple(k.value for k in parse_kinds(kinds)) if kinds else None,
                       mode=mode, ssl_context=client_tls(*tls), **extra, **kw)


def _window_report(report: Any, as_json: bool) -> None:
    if as_json:
        _print_json(report.to_dict())
    else:
        for line in report.lines():
            typer.echo(line, err=not report.ok and line.startswith("  reason"))
    if not report.ok:
        _fail(f"{report.vm}: {report.to_dict()['meaning']}"
              + (f" ({report.error})" if report.error else ""))


@app.command("qemu-hook")
def qemu_hook(
    qmp: QmpSockOpt,
    vm: VmIdOpt,
    manager: ManagerOpt,
    source: FromOpt = None,
    destination: ToOpt = "",
    deadline_ms: DeadlineOpt = 1000,
    on_fail: OnFailOpt = "cancel",
    kinds: MsgKindsOpt = None,
    mode: ModeOpt = None,
    wait_s: Annotated[float | None, typer.Option("--wait-s", help="Give up if no migration reaches "
                                                 "its pause window in this time.")] = None,
    observe: Annotated[bool, typer.Option("--observe", help="Do not own the window (libvirt owns it): "
                                          "send the message when the guest stops for migration. "
                                          "Ordering NOT guaranteed; the report says by how much "
                                          "the state was late.")] = False,
    cacert: ManagerCaOpt = None,
    cert: ManagerCertOpt = None,
    key: ManagerKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Own the next migration's pause window on the source QEMU and move the VM's state in it.

    Start it before `migrate`. It arms pause-before-switchover and waits for the guest to stop.

    In the window it sends the migration message and ends the window with migrate-continue when
    the manager answers, or per --on-fail on error or deadline.

    Rerun it to end a window that a killed run left open. With --observe (libvirt hosts) it only
    watches: see docs/hypervisor.md.

    Example: xfer qemu-hook --qmp /run/vm1.qmp --vm vm1 --manager http://mgr:8700/migrations --to hv2
    """
    from xfer.hypervisor import hook
    from xfer.hypervisor import observe as observer

    opts = _hook_options(vm, manager, source, destination, deadline_ms, on_fail, kinds, mode,
                         (cacert, cert, key), wait_s=wait_s)
    def ready() -> None:
        sys.stderr.write(f"xfer: watching {qmp} for {vm}'s migration stop (observer)\n")
        sys.stderr.flush()

    run = observer.observe(qmp, opts, on_ready=ready) if observe else hook.run_hook(qmp, opts)
    _window_report(hook.run_sync(run), as_json)


@app.command("qemu-migrate")
def qemu_migrate(
    src_qmp: Annotated[str, typer.Option("--src-qmp", help="Source QEMU's QMP socket.", metavar="S")],
    dst_qmp: Annotated[str, typer.Option("--dst-qmp", help="Destination QEMU's QMP socket (started "
                                         "with -incoming defer).", metavar="D")],
    uri: Annotated[str, typer.Option("--uri", help="Migration URI, e.g. tcp:127.0.0.1:4444.")],
    vm: VmIdOpt,
    manager: ManagerOpt,
    source: FromOpt = None,
    destination: ToOpt = "",
    deadline_ms: DeadlineOpt = 1000,
    on_fail: OnFailOpt = "cancel",
    kinds: MsgKindsOpt = None,
    mode: ModeOpt = None,
    cacert: ManagerCaOpt = None,
    cert: ManagerCertOpt = None,
    key: ManagerKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Migrate a QEMU guest with the hook in its pause window; report downtime and guest gap.

    Example: xfer qemu-migrate --src-qmp /run/a.qmp --dst-qmp /run/b.qmp --uri tcp:127.0.0.1:4444
    --vm vm1 --manager http://127.0.0.1:8700/migrations --json
    """
    from xfer.hypervisor import hook, migrate

    opts = _hook_options(vm, manager, source, destination, deadline_ms, on_fail, kinds, mode,
                         (cacert, cert, key))
    _window_report(hook.run_sync(migrate.run_migration(src_qmp, dst_qmp, uri, opts)), as_json)


# --- dhcp ------------------------------------------------------------------------------

DbOpt = Annotated[Path | None, typer.Option(
    "--db", help="Snooping database file (default: $XFER_DHCP_STATE_DIR or "
    "/var/lib/xfer/dhcpsnoop, then <netns>.json).")]


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for text in values or [] for v in text.split(",") if v.strip()]


@dhcp_app.command("attach")
def dhcp_attach(
    untrusted: Annotated[list[str], typer.Option(
        "--untrusted", help="Ports towards VMs (comma-separated or repeated).")],
    trusted: Annotated[list[str] | None, typer.Option(
        "--trusted", help="Ports towards the DHCP server.")] = None,
    netns: NetnsOpt = None,
    mode: Annotated[str, typer.Option(help="enforce (drop) or observe (count only).")] = "enforce",
    db: DbOpt = None,
    ebpf: Annotated[bool, typer.Option("--ebpf", hidden=True, help="Print the program.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Attach the snooper to a device's ports; again re-attaches and keeps every binding.

    Example: xfer dhcp attach --trusted uplink --untrusted vm0,vm1 --netns sw1
    """
    from xfer.dhcpsnoop import datapath, device

    if ebpf:
        typer.echo(datapath.source_text())
        return
    report = device.attach(netns, _split(trusted), _split(untrusted), mode, db)
    if as_json:
        _print_json({"ports": report.ports, "restored": report.restored, "kept": report.kept,
                     "warnings": report.warnings})
        return
    typer.echo(f"attached to {', '.join(report.ports)} ({mode}); "
               f"{report.kept} bindings kept, {report.restored} restored from the database")
    for w in report.warnings:
        typer.echo(f"  warning: {w}", err=True)


@dhcp_app.command("detach")
def dhcp_detach(
    netns: NetnsOpt = None,
    purge: Annotated[bool, typer.Option("--purge", help="Also unpin the maps (bindings stay "
                                        "in the database file).")] = False,
) -> None:
    """Remove the snooper's filters from every port.

    Example: xfer dhcp detach --netns sw1 --purge
    """
    from xfer.dhcpsnoop import device

    n = device.detach(netns, purge)
    typer.echo(f"detached from {n} ports" + (", maps unpinned" if purge else ""))


@dhcp_app.command("bindings")
def dhcp_bindings(
    netns: NetnsOpt = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include expired bindings.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the binding table: MAC, IP, lease remaining, port, VLAN.

    Example: xfer dhcp bindings --netns sw1 --json
    """
    from xfer.dhcpsnoop.store import BindingTable

    with BindingTable(netns) as table:
        rows = table.bindings(include_expired=show_all)
    if as_json:
        _print_json([b.to_json() for b in rows])
        return
    from rich.console import Console
    from rich.table import Table

    out = Table("mac", "ip", "lease left (s)", "port", "vlan", "source", box=None)
    for b in rows:
        left = "infinite" if b.lease_remaining is None else f"{b.lease_remaining:.0f}"
        out.add_row(b.mac, b.ip, left, b.port or "any", str(b.vlan or "-"), b.source)
    Console().print(out)
    typer.echo(f"{len(rows)} bindings", err=True)


@dhcp_app.command("add")
def dhcp_add(
    mac: Annotated[str, typer.Option("--mac", help="Client MAC.")],
    ip: Annotated[str, typer.Option("--ip", help="Client IPv4 address.")],
    port: Annotated[str | None, typer.Option("--port", help="Untrusted port (default: any, "
                                             "pinned by the first packet).")] = None,
    vlan: Annotated[int, typer.Option(help="VLAN id (0: untagged).")] = 0,
    lease: Annotated[int | None, typer.Option(help="Lease in seconds (default: never "
                                              "expires).")] = None,
    netns: NetnsOpt = None,
    db: DbOpt = None,
) -> None:
    """Add (or replace) a static binding.

    Example: xfer dhcp add --mac 02:00:00:00:00:09 --ip 10.0.0.9 --port vm0 --netns sw1
    """
    from xfer.dhcpsnoop import device
    from xfer.dhcpsnoop.model import Binding

    b = Binding(mac, ip, None if lease is None else float(lease), port, vlan, "static",
                lease or 0)
    created, warnings = device.add_static(netns, b, db)
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(("added" if created else "replaced") + f" {b.mac} {b.ip}")


@dhcp_app.command("del")
def dhcp_del(
    mac: Annotated[str, typer.Option("--mac", help="Client MAC.")],
    ip: Annotated[str, typer.Option("--ip", help="Client IPv4 address.")],
    netns: NetnsOpt = None,
    db: DbOpt = None,
) -> None:
    """Delete a binding (static or learned).

    Example: xfer dhcp del --mac 02:00:00:00:00:09 --ip 10.0.0.9 --netns sw1
    """
    from xfer.dhcpsnoop import device

    if not device.delete(netns, mac, ip, db):
        _fail(f"no binding {mac} {ip}")
    typer.echo(f"deleted {mac} {ip}")


@dhcp_app.command("counters")
def dhcp_counters(netns: NetnsOpt = None, as_json: JsonOpt = False) -> None:
    """Per-port counters: passed, drops by reason, observed, bindings added/removed.

    Example: xfer dhcp counters --netns sw1 --json
    """
    from xfer.dhcpsnoop.store import BindingTable

    with BindingTable(netns) as table:
        counters = table.counters()
    if as_json:
        _print_json(counters)
        return
    for port, values in sorted(counters.items()):
        typer.echo(port + ": " + ", ".join(f"{k} {v}" for k, v in sorted(values.items())))


@dhcp_app.command("serve")
def dhcp_serve(
    netns: NetnsOpt = None,
    untrusted: Annotated[list[str] | None, typer.Option(
        "--untrusted", help="Attach first to these ports towards VMs.")] = None,
    trusted: Annotated[list[str] | None, typer.Option(
        "--trusted", help="... and these towards the DHCP server.")] = None,
    mode: Annotated[str, typer.Option(help="enforce or observe (with --untrusted).")] = "enforce",
    interval: Annotated[float, typer.Option(help="Seconds between sweeps/saves.")] = 0.2,
    db: DbOpt = None,
) -> None:
    """Run in the foreground: persist the binding table after each change, sweep expired ones.

    Enforcement needs no process (DHCP is parsed in the kernel); this keeps the
    snooping database file current. Run it under systemd or a supervisor; SIGTERM
    stops it cleanly.

    Example: xfer dhcp serve --netns sw1 --trusted uplink --untrusted vm0,vm1
    """
    import asyncio

    from xfer.dhcpsnoop import device
    from xfer.dhcpsnoop.serve import Snooper

    if untrusted or trusted:
        device.attach(netns, _split(trusted), _split(untrusted), mode, db)
    logging.getLogger("xfer").setLevel(logging.INFO)
    asyncio.run(Snooper(netns, interval, db).run())


def _register_manager() -> None:
    from xfer.manager.cli import register

    register(app, bench_app)


_register_manager()


# Commands a hypervisor hook runs inside the pause window. typer inspects the
# signature of every registered command at start (~70 ms for all of them), so for
# these only the command itself is built (``_root`` keeps it a subcommand).
_PAUSE_WINDOW = frozenset({"export", "import", "forget", "notify"})


def main() -> None:
    """Console entry point: map errors to exit codes and one-line messages."""
    logging.basicConfig(level=logging.WARNING, format="xfer: %(message)s")
    heap.keep_freed_memory()  # MB-sized buffers without page faults inside the pause window
    if len(sys.argv) > 1 and sys.argv[1] in _PAUSE_WINDOW:
        app.registered_groups = []
        app.registered_commands = [c for c in app.registered_commands if c.name == sys.argv[1]]
    try:
        app()
    except UsageError as exc:
        _fail(str(exc), 2)
    except XferError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


if __name__ == "__main__":
    main()
