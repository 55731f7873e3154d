"""``xfer agent ...`` and ``xfer pki ...``: the device agent and its certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from xfer.cli.common import (
    JsonOpt,
    KindsOpt,
    VmOpt,
    app,
    fail,
    log_level,
    print_json,
    print_report,
    report_failed,
)

agent_app = typer.Typer(help="The device agent: serve, and drive agents over mutual TLS.",
                        no_args_is_help=True)
pki_app = typer.Typer(help="A small CA and per-device certificates for agents (labs, small sites).",
                      no_args_is_help=True)
app.add_typer(agent_app, name="agent")
app.add_typer(pki_app, name="pki")


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
    from xfer.agent import client
    from xfer.net import tls

    return client.run_sync(tls.client_context(ca, cert, key), op, timeout)


@agent_app.command("serve")
def agent_serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="Agent configuration (TOML).")],
) -> None:
    """Run the agent of one device until SIGTERM (logs one JSON line per request on stderr).

    Example: xfer agent serve --config /etc/xfer/agent.toml
    """
    import asyncio
    import logging

    from xfer.agent import config as config_mod
    from xfer.agent import server
    from xfer.net.log import daemon_logging

    daemon_logging(log_level(logging.INFO))
    asyncio.run(server.serve(config_mod.load(config)))


@agent_app.command("status")
def agent_status(agent: AgentOpt, ca: CaOpt, cert: CertOpt = None, key: CertKeyOpt = None,
                 timeout: TimeoutOpt = 30, as_json: JsonOpt = False) -> None:
    """Show a device's type, kinds, per-kind counts and unfinished imports.

    Example: xfer agent status --agent https://10.0.4.1:7443 --ca ca.pem --cert op.pem --key op.key
    """
    result = _agent_run(ca, cert, key, timeout, lambda c: c.status(agent))
    if as_json:
        print_json(result)
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
        print_json({"file": str(out), "bytes": len(data)})
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
        fail(f"cannot read {file}: {exc.strerror}")
    report = _agent_run(ca, cert, key, timeout, lambda c: c.import_(agent, data, ident, kind_list))
    print_json(report) if as_json else print_report(report)
    if report_failed(report):
        fail("import failed at the agent (see the report)")


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
        print_json(reports)
    else:
        for kind, r in reports.items():
            typer.echo(f"{kind}: deleted {r['deleted']}, already gone {r['skipped']}, failed {r['failed']}")
    if any(r.get("failed") for r in reports.values()):
        fail("some entries could not be deleted")


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
        print_json(result)
    else:
        typer.echo(f"pushed {result['bytes']} bytes to {result['destination']}")
        print_report(result["report"])
    if not result.get("ok"):
        fail("push failed at the destination (see the report)")


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
    print_json(report) if as_json else print_report(report)
    if report_failed(report):
        fail("pull failed (see the report)")


# --- pki ---------------------------------------------------------------------------------

PkiDirOpt = Annotated[Path, typer.Option("--dir", help="Directory of the CA and certificates.")]


@pki_app.command("init")
def pki_init(directory: PkiDirOpt,
             name: Annotated[str, typer.Option("--name", help="CA common name.")] = "xfer CA",
             days: Annotated[int, typer.Option(help="Validity in days.")] = 3650,
             force: Annotated[bool, typer.Option("--force", help="Replace an existing CA.")] = False,
             as_json: JsonOpt = False) -> None:
    """Create a CA (ca.pem, ca.key) for the agents of a lab or small site.

    Example: xfer pki init --dir /etc/xfer/pki
    """
    from xfer import pki

    ca = pki.init_ca(directory, name, days, force)
    print_json({"ca": str(ca)}) if as_json else typer.echo(f"CA certificate {ca}")


@pki_app.command("issue")
def pki_issue(name: Annotated[str, typer.Argument(help="Device (or operator) name: the "
                                                  "certificate's common name.")],
              directory: PkiDirOpt,
              ip: Annotated[list[str] | None, typer.Option("--ip", help="An address the device is "
                                                           "reached at (repeat).")] = None,
              dns: Annotated[list[str] | None, typer.Option("--dns", help="Another DNS name "
                                                            "(repeat).")] = None,
              days: Annotated[int, typer.Option(help="Validity in days.")] = 825,
              as_json: JsonOpt = False) -> None:
    """Issue NAME.pem and NAME.key signed by the CA in --dir (good as server and client).

    Example: xfer pki issue fw-src --dir /etc/xfer/pki --ip 10.0.4.1
    """
    from xfer import pki

    cert, key = pki.issue(directory, name, ip or [], dns or [], days)
    if as_json:
        print_json({"cert": str(cert), "key": str(key)})
        return
    typer.echo(f"certificate {cert}, key {key}")
