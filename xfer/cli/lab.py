"""``xfer lab up|down|demo``: the network-namespace lab."""

from __future__ import annotations

from typing import Annotated

import typer

from xfer.cli.common import (
    JsonOpt,
    app,
    fail,
    print_json,
    progress,
)

lab_app = typer.Typer(help="The network-namespace lab: two firewalls, a VM and a server.",
                      no_args_is_help=True)
app.add_typer(lab_app, name="lab")


@lab_app.command("up")
def lab_up(
    prefix: Annotated[str, typer.Option(help="Namespace name prefix.")] = "xfer",
    as_json: JsonOpt = False,
) -> None:
    """Build the lab: VM, source firewall, destination firewall and server namespaces.

    Example: xfer lab up && ip netns exec xfer-vm ping -c1 10.0.2.2
    """
    from xfer.lab import topology

    lab = topology.Lab(prefix)
    with progress("lab up"):
        lab.up()
    if as_json:
        print_json({"vm": lab.vm, "source_firewall": lab.vm_side, "destination_firewall": lab.fwdst,
                    "server": lab.srv, "vm_ips": [topology.VM_IP, topology.VM_IP6],
                    "server_ips": [topology.SERVICE_IP, topology.SERVICE_IP6]})
        return
    typer.echo(lab.describe())


@lab_app.command("down")
def lab_down(prefix: Annotated[str, typer.Option(help="Namespace name prefix.")] = "xfer",
             as_json: JsonOpt = False) -> None:
    """Remove every namespace and process of the lab."""
    from xfer.lab import topology

    topology.Lab(prefix).down()
    print_json({"removed": prefix}) if as_json else typer.echo("lab removed")


@lab_app.command("demo")
def lab_demo(
    prefix: Annotated[str, typer.Option(help="Namespace name prefix.")] = "xfer",
    as_json: JsonOpt = False,
) -> None:
    """Migrate the lab VM with a live TCP conversation, then the control without transfer.

    Example: xfer lab demo
    """
    from xfer.lab import demo

    with progress("lab demo"):
        result = demo.run(prefix, echo=None if as_json else typer.echo)
    if as_json:
        print_json(result)
    if not result["ok"]:
        fail("demo failed: " + result["reason"])
