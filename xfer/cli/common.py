"""What every ``xfer`` subcommand module shares: the app, common options, output helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

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


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"xfer: {message}\n")
    raise SystemExit(code)


def print_report(report: dict[str, Any]) -> None:
    for kind, r in report.get("kinds", {}).items():
        if "created" in r:
            typer.echo(f"{kind}: created {r['created']}, updated {r['updated']}, skipped {r['skipped']}, "
                       f"failed {r['failed']} ({r['seconds'] * 1000:.1f} ms)"
                       + (" — rolled back" if r.get("rolled_back") else ""))
        if "error" in r:
            typer.echo(f"{kind}: {r['error']}", err=True)


def report_failed(report: dict[str, Any]) -> bool:
    return bool(report.get("failed")) or any("error" in r for r in report.get("kinds", {}).values())
