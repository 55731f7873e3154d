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
from xfer.errors import UsageError

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
    prefix: Annotated[str | None, typer.Option(help="Namespace name prefix (default: xfer, "
                                                "or xg with --guest).")] = None,
    guest: Annotated[bool, typer.Option("--guest", help="The end-to-end story with real Linux "
                                        "guests live-migrating under QEMU (what `make demo` runs).")] = False,
    namespaces: Annotated[bool, typer.Option("--namespaces", help="The namespace-only demo (a "
                                             "namespace stands in for the VM); the default "
                                             "without --guest.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Migrate a VM with a live TCP conversation, then the control without xfer.

    With --guest: two Debian guests boot under QEMU in hv1 and take DHCP leases through a
    snooping switch; vm1 live-migrates to hv2 with `xfer qemu-hook` owning the pause window
    and the manager moving its conntrack entry, DHCP binding and counters; vm2 migrates
    without xfer. --json prints guest_booted, tcp_continued, dhcp_binding_moved,
    counters_carried, control_cut, downtime_ms, guest_gap_ms, pause_cost_ms; exit 0 only
    when every check held.

    Example: xfer lab demo --guest --json

    Example: xfer lab demo --namespaces
    """
    if guest and namespaces:
        raise UsageError("--guest and --namespaces are two different demos: choose one")
    if guest:
        from xfer.lab import guest_demo

        with progress("lab demo --guest"):
            result = guest_demo.run(prefix or "xg", echo=None if as_json else typer.echo)
        if as_json:
            print_json(result)
        if not result["ok"]:
            failed = [k for k in ("guest_booted", "tcp_continued", "dhcp_binding_moved",
                                  "counters_carried", "control_cut") if not result[k]]
            fail("guest demo failed: " + (result["details"].get("error") or ", ".join(failed)))
        return
    from xfer.lab import demo

    with progress("lab demo"):
        result = demo.run(prefix or "xfer", echo=None if as_json else typer.echo)
    if as_json:
        print_json(result)
    if not result["ok"]:
        fail("demo failed: " + result["reason"])
