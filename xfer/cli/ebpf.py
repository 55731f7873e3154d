"""``xfer counters ...`` and ``xfer dhcp ...``: the eBPF kinds on a device."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from xfer.cli.common import (
    JsonOpt,
    NetnsOpt,
    app,
    fail,
    print_json,
)
from xfer.errors import UsageError

counters_app = typer.Typer(help="Per-VM packet, byte and TCP connection counters (eBPF on the "
                                "device's VM-facing interface).", no_args_is_help=True)
app.add_typer(counters_app, name="counters")
dhcp_app = typer.Typer(help="DHCP snooping, IP source guard and ARP inspection (eBPF).",
                       no_args_is_help=True)
app.add_typer(dhcp_app, name="dhcp")


DevOpt = Annotated[str, typer.Option("--dev", help="The device's VM-facing interface.",
                                     metavar="IFACE")]


@counters_app.command("attach")
def counters_attach(
    dev: Annotated[str | None, typer.Option("--dev", help="The device's VM-facing interface "
                                            "(required unless --ebpf).", metavar="IFACE")] = None,
    netns: NetnsOpt = None,
    ebpf: Annotated[bool, typer.Option("--ebpf", help="Print the BPF program and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Count per VM (MAC, IP) on an interface; idempotent. Counts persist in pinned maps.

    Ingress frames are what the VMs send (tx), egress what they receive (rx).

    Example: xfer counters attach --dev vmif --netns fw-src
    """
    if ebpf:
        from xfer.counters.device import PROGRAM
        from xfer.ebpf import loader

        sys.stdout.write(loader.source_text(PROGRAM))
        return
    if not dev:
        raise UsageError("--dev IFACE is required (the device's VM-facing interface)")
    from xfer.counters import device as counters_device

    pins = counters_device.attach(dev, netns)
    if as_json:
        print_json({"dev": dev, "netns": netns, "pinned": str(pins)})
        return
    typer.echo(f"counting on {dev} (maps pinned in {pins})")


@counters_app.command("detach")
def counters_detach(
    dev: DevOpt,
    netns: NetnsOpt = None,
    unpin: Annotated[bool, typer.Option("--unpin", help="Also remove the pinned maps: the "
                                        "counts are lost.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stop counting on an interface; the counts stay pinned (re-attach resumes them).

    Example: xfer counters detach --dev vmif --netns fw-src
    """
    from xfer.counters import device as counters_device

    removed = counters_device.detach(dev, netns, unpin=unpin)
    if as_json:
        print_json({"dev": dev, "netns": netns, "filters_removed": removed, "unpinned": unpin})
        return
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
    from xfer.counters import model as counters
    from xfer.counters import transfer as counters_transfer
    from xfer.model import parse_vm

    rows = counters.rows(counters_transfer.show(parse_vm(vm) if vm else None, netns, dev=dev))
    if as_json:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("mac", "ip", *counters.FIELDS, box=None)
    for r in rows:
        table.add_row(r["mac"], r["ip"], *(str(r[f]) for f in counters.FIELDS))
    Console().print(table)


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
    from xfer.dhcp import datapath, device

    if ebpf:
        typer.echo(datapath.source_text())
        return
    report = device.attach(netns, _split(trusted), _split(untrusted), mode, db)
    if as_json:
        print_json({"ports": report.ports, "restored": report.restored, "kept": report.kept,
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
    as_json: JsonOpt = False,
) -> None:
    """Remove the snooper's filters from every port.

    Example: xfer dhcp detach --netns sw1 --purge
    """
    from xfer.dhcp import device

    n = device.detach(netns, purge)
    if as_json:
        print_json({"netns": netns, "ports": n, "unpinned": purge})
        return
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
    from xfer.dhcp.store import BindingTable

    with BindingTable(netns) as table:
        rows = table.bindings(include_expired=show_all)
    if as_json:
        print_json([b.to_json() for b in rows])
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
    as_json: JsonOpt = False,
) -> None:
    """Add (or replace) a static binding.

    Example: xfer dhcp add --mac 02:00:00:00:00:09 --ip 10.0.0.9 --port vm0 --netns sw1
    """
    from xfer.dhcp import device
    from xfer.dhcp.model import Binding

    b = Binding(mac, ip, None if lease is None else float(lease), port, vlan, "static",
                lease or 0)
    created, warnings = device.add_static(netns, b, db)
    if as_json:
        print_json({**b.to_json(), "created": created, "warnings": warnings})
        return
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(("added" if created else "replaced") + f" {b.mac} {b.ip}")


@dhcp_app.command("del")
def dhcp_del(
    mac: Annotated[str, typer.Option("--mac", help="Client MAC.")],
    ip: Annotated[str, typer.Option("--ip", help="Client IPv4 address.")],
    netns: NetnsOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a binding (static or learned).

    Example: xfer dhcp del --mac 02:00:00:00:00:09 --ip 10.0.0.9 --netns sw1
    """
    from xfer.dhcp import device

    if not device.delete(netns, mac, ip, db):
        fail(f"no binding {mac} {ip}")
    print_json({"mac": mac, "ip": ip, "deleted": True}) if as_json else typer.echo(f"deleted {mac} {ip}")


@dhcp_app.command("counters")
def dhcp_counters(netns: NetnsOpt = None, as_json: JsonOpt = False) -> None:
    """Per-port counters: passed, drops by reason, observed, bindings added/removed.

    Example: xfer dhcp counters --netns sw1 --json
    """
    from xfer.dhcp.store import BindingTable

    with BindingTable(netns) as table:
        counters = table.counters()
    if as_json:
        print_json(counters)
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

    from xfer.dhcp import device
    from xfer.dhcp.serve import Snooper

    if untrusted or trusted:
        device.attach(netns, _split(trusted), _split(untrusted), mode, db)
    logging.getLogger("xfer").setLevel(logging.INFO)
    asyncio.run(Snooper(netns, interval, db).run())
