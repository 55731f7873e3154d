"""The manager's commands (thin: parse, call, print).

    xfer topology check|show FILE
    xfer manager serve --config FILE
    xfer notify --vm VM --indication not-running --direction out --from S --to D [--udp H:P]
    xfer migrate VM --from S --to D [--mode relay|pull|push|store];  xfer migrate --abort VM
    xfer migrations [--journal FILE] [--json]
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from xfer.cli.common import JsonOpt, app, log_level, print_json
from xfer.errors import UsageError
from xfer.net import DEFAULT_MANAGER_URL
from xfer.net.address import hostport

topology_app = typer.Typer(help="The topology file: servers, devices, links, gateways.",
                           no_args_is_help=True)
manager_app = typer.Typer(help="The migration manager daemon.", no_args_is_help=True)
app.add_typer(topology_app, name="topology")
app.add_typer(manager_app, name="manager")

ManagerUrlOpt = Annotated[str, typer.Option("--manager", help="The manager's message URL; several, "
                                            "comma-separated, for managers sharing an etcd journal "
                                            "(the leader is found, a dead one skipped).",
                                            envvar="XFER_MANAGER", metavar="URL")]
MgrCaOpt = Annotated[Path | None, typer.Option("--ca", help="CA that signs the manager's certificate.",
                                               envvar="XFER_MANAGER_CA", metavar="FILE")]
MgrCertOpt = Annotated[Path | None, typer.Option("--cert", help="Client certificate (the manager "
                                                 "refuses clients without one).",
                                                 envvar="XFER_MANAGER_CERT", metavar="FILE")]
MgrKeyOpt = Annotated[Path | None, typer.Option("--key", help="Key of --cert.", envvar="XFER_MANAGER_KEY",
                                                metavar="FILE")]
UdpOpt = Annotated[str | None, typer.Option("--udp", help="Send as one datagram to HOST:PORT "
                                            "(unicast or a multicast group) instead of HTTPS.")]
IfaceOpt = Annotated[str | None, typer.Option("--interface", help="Local address datagrams leave from "
                                              "(multicast: the interface to send on).")]
JournalOpt = Annotated[Path, typer.Option("--journal", help="The manager's journal (SQLite).")]


def _context(ca: Path | None, cert: Path | None, key: Path | None) -> Any:
    from xfer.net import tls

    if ca is None:
        raise UsageError("--ca is required (the manager speaks mutual TLS only)")
    return tls.client_context(ca, cert, key)


def _send(body: dict[str, Any], manager: str, udp: str | None, interface: str | None, ca: Path | None,
          cert: Path | None, key: Path | None, timeout: float, copies: int = 1) -> dict[str, Any]:
    from xfer.net import notify

    if udp:
        answer = notify.send_udp(hostport(udp, "--udp"), body, timeout, interface, copies=copies)
        assert answer is not None
        return answer
    return notify.send_http(manager, body, _context(ca, cert, key), timeout)


def _print_report(report: dict[str, Any]) -> None:
    state = report.get("state", "aborted" if report.get("aborted") else "?")
    head = f"{report.get('vm')}: migration {report.get('migration', '-')} {state}"
    if report.get("ms") is not None:
        head += (f" in {report['ms']:.1f} ms (budget {report.get('budget_ms', 0):.0f} ms"
                 + (", OVER BUDGET)" if report.get("over_budget") else ")"))
    if report.get("precopy"):
        pc = report["precopy"]
        head += f"; pre-copy: {pc.get('staged', 0)} entries staged, {pc.get('deltas', 0)} deltas"
    typer.echo(head)
    for p in report.get("phases", []):
        ms = f"{p['ms']:.1f} ms" if p.get("ms") is not None else "unfinished"
        kinds = ",".join(p["kinds"])
        typer.echo(f"  {p['name']:<8} {p['device']:<12} {kinds:<24} {p['outcome'] or '-':<8} {ms}")
    for kind, why in report.get("missing", {}).items():
        typer.echo(f"  not moved: {kind}: {why}", err=True)
    for kind, devices in report.get("also_held_by", {}).items():
        typer.echo(f"  also held by {', '.join(devices)}: {kind} (not moved, not cleaned there)", err=True)


@topology_app.command("check")
def topology_check(file: Annotated[Path, typer.Argument(help="Topology file (YAML).")],
                   as_json: JsonOpt = False) -> None:
    """Validate a topology file: exit 0 when good, else one line naming the defect.

    Example: xfer topology check /etc/xfer/topology.yaml
    """
    from xfer.manager import topology

    topo = topology.load(file)
    if as_json:
        print_json({"file": str(file), "ok": True, "servers": len(topo.servers),
                    "devices": len(topo.devices), "links": len(topo.links)})
        return
    typer.echo(f"{file}: {len(topo.servers)} servers, {len(topo.devices)} devices, "
               f"{len(topo.links)} links: ok")


@topology_app.command("show")
def topology_show(file: Annotated[Path, typer.Argument(help="Topology file (YAML).")],
                  source: Annotated[str | None, typer.Option("--from", help="With --to: the plan.")] = None,
                  destination: Annotated[str | None, typer.Option("--to")] = None,
                  as_json: JsonOpt = False) -> None:
    """Print each server's uplink path (device[kinds]); with --from/--to, which device gives and
    takes each kind.

    Example: xfer topology show topology.yaml --from hv1 --to hv2
    """
    from xfer.manager import plan, topology

    topo = topology.load(file)
    if source and destination:
        p = plan.select(topo, source, destination)
        if as_json:
            print_json(p.to_dict())
            return
        for r in p.routes:
            also = (f" (also held by {', '.join(d.id for d in r.also_held_by)}: not moved)"
                    if r.also_held_by else "")
            typer.echo(f"{r.kind}: {r.source.id} -> {', '.join(d.id for d in r.destinations)}{also}")
        for kind, why in p.missing.items():
            typer.echo(f"{kind}: NOT MOVED: {why}")
        return
    if as_json:
        print_json({s: topology.uplink_path(topo, s) for s in topo.servers})
        return
    for line in topology.describe(topo):
        typer.echo(line)


@manager_app.command("serve")
def manager_serve(config: Annotated[Path, typer.Option("--config", "-c", help="Manager configuration "
                                                       "(TOML).")]) -> None:
    """Run the manager until SIGTERM (one JSON log line per message on stderr).

    Example: xfer manager serve --config /etc/xfer/manager.toml
    """
    import asyncio

    from xfer.manager import config as config_mod
    from xfer.manager import server
    from xfer.net.log import daemon_logging

    daemon_logging(log_level(logging.INFO))
    asyncio.run(server.serve(config_mod.load(config)))


@app.command("notify")
def notify(
    vm: Annotated[str, typer.Option("--vm", help="VM id (inventory name) or addresses.")],
    indication: Annotated[str, typer.Option("--indication", help="not-running | starting | abort | "
                                            "migrating")],
    direction: Annotated[str, typer.Option("--direction", help="out | in")] = "out",
    source: Annotated[str, typer.Option("--from", help="Source server.")] = "",
    destination: Annotated[str, typer.Option("--to", help="Destination server.")] = "",
    kinds: Annotated[str | None, typer.Option("--kinds", help="Kinds (default: all the plan finds).")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="relay|pull|push|store")] = None,
    manager: ManagerUrlOpt = DEFAULT_MANAGER_URL,
    udp: UdpOpt = None, interface: IfaceOpt = None,
    ca: MgrCaOpt = None, cert: MgrCertOpt = None, key: MgrKeyOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the answer.")] = 30,
    message_id: Annotated[str | None, typer.Option("--id", help="The message's id (default: a new "
                                                   "one). Copies with one id are acted on once.")] = None,
    copies: Annotated[int, typer.Option("--copies", min=1, help="With --udp: send the datagram this "
                                        "many times.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Send one migration message (HTTPS, or a UDP datagram with --udp) and print the answer.

    Store mode to the multicast group the agents join is the device-driven variant: the
    devices deposit ("out") and collect ("in") themselves. An "out" without --to is
    kept in the store until the destination's "in" (which names it with --to).

    Example: xfer notify --vm vm1 --indication not-running --direction out --from hv1 --to hv2
    --mode store --udp 239.7.7.7:8702 --interface 10.0.4.20
    """
    import secrets

    body: dict[str, Any] = {"vm": vm, "indication": indication, "direction": direction,
                            "source": source, "destination": destination,
                            "id": message_id or secrets.token_hex(8)}
    if kinds:
        body["kinds"] = [k.strip() for k in kinds.split(",") if k.strip()]
    if mode:
        body["mode"] = mode
    report = _send(body, manager, udp, interface, ca, cert, key, timeout, copies)
    print_json(report) if as_json else _print_report(report)


@app.command("migrate")
def migrate(
    vm: Annotated[str | None, typer.Argument(help="VM id (inventory name) or addresses.")] = None,
    source: Annotated[str | None, typer.Option("--from", help="Source server.")] = None,
    destination: Annotated[str | None, typer.Option("--to", help="Destination server.")] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="relay|pull|push|store (default: the "
                                             "manager's).")] = None,
    kinds: Annotated[str | None, typer.Option("--kinds", help="Kinds (default: all the plan finds).")] = None,
    abort: Annotated[str | None, typer.Option("--abort", help="Abort VM's migration: roll back its "
                                              "destinations, leave its source as it was.",
                                              metavar="VM")] = None,
    prepare: Annotated[bool, typer.Option("--prepare", help="Send \"migrating\" (the VM still runs): "
                                          "stage its conntrack state at the destination now and "
                                          "stream changes; the later call without --prepare moves "
                                          "only the last delta.")] = False,
    manager: ManagerUrlOpt = DEFAULT_MANAGER_URL,
    ca: MgrCaOpt = None, cert: MgrCertOpt = None, key: MgrKeyOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the answer.")] = 60,
    as_json: JsonOpt = False,
) -> None:
    """Move a VM's network state from one server's uplink devices to another's, now.

    In store mode this sends "out" then "in". Exit 1 when the migration failed (its
    destinations were rolled back). With --prepare it sends "migrating" and returns once
    the bulk copy is staged (pre-copy; relay, pull and push modes).

    Example: xfer migrate vm1 --from hv1 --to hv2 --mode pull --ca ca.pem --cert op.pem --key op.key

    Example: xfer migrate vm1 --from hv1 --to hv2 --prepare   (then, in the pause, without --prepare)
    """
    if abort:
        report = _send({"vm": abort, "indication": "abort"}, manager, None, None, ca, cert, key, timeout)
        print_json(report) if as_json else typer.echo(f"{abort}: aborted ({report.get('was')})")
        return
    if not vm or not source or not destination:
        raise UsageError("migrate needs VM, --from and --to (or --abort VM)")
    from xfer.net.message import messages_for

    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip()) if kinds else None
    if prepare:
        from xfer.net.message import MigrationMessage, Mode

        if mode == "store":
            raise UsageError("--prepare works in relay, pull and push modes (store mode learns the "
                             "destination only after the pause)")
        messages = [MigrationMessage(vm, "migrating", "out", source, destination, kind_list,
                                     Mode.of(mode) if mode else None)]
    else:
        messages = messages_for(vm, source, destination, kind_list, mode)
    reports = [_send(m.to_json(), manager, None, None, ca, cert, key, timeout) for m in messages]
    if as_json:
        print_json(reports[-1] if len(reports) == 1 else {"messages": reports, **reports[-1]})
        return
    for r in reports:
        _print_report(r)


@app.command("migrations")
def migrations(
    journal: JournalOpt = Path("/var/lib/xfer/manager.db"),
    config: Annotated[Path | None, typer.Option("--config", help="Read the journal the manager "
                                                "configuration names (SQLite or etcd).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Newest N.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List migrations from the manager's journal with per-phase timings. A rollback that could
    not be done yet shows as state rollback-pending (retried by the manager until it is).

    Example: xfer migrations --journal /var/lib/xfer/manager.db --json
    Example: xfer migrations --config /etc/xfer/manager.toml
    """
    from xfer.manager.sqlite import SqliteJournal

    if config is not None:
        from xfer.manager import config as manager_config

        cfg = manager_config.load(config)
        if cfg.backend.backend == "etcd":
            items = asyncio.run(_recent_in(cfg, limit))
            _list(items, as_json)
            return
        journal = cfg.journal
    if not journal.exists():
        raise UsageError(f"journal {journal} not found")
    j = SqliteJournal(journal)
    try:
        items = [m.to_dict() for m in j.recent_now(limit)]
    finally:
        j.close_now()
    _list(items, as_json)


async def _recent_in(cfg: Any, limit: int) -> list[dict[str, Any]]:
    from xfer.manager.backends import open_backend

    journal, store = await open_backend(cfg)
    try:
        return [m.to_dict() for m in await journal.recent(limit)]
    finally:
        await store.close()
        await journal.close()


def _list(items: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(items)
        return
    for m in items:
        _print_report({**m, "migration": m["id"], "state": m["state"]})
