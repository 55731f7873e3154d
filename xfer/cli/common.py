"""What every ``xfer`` subcommand module shares: the app, common options, output helpers."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

import xfer

app = typer.Typer(
    name="xfer",
    help="Move a live-migrating VM's network state (conntrack, DHCP bindings, counters) "
         "between Linux firewalls inside the migration's pause window.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class _Run:
    """How this run reports: JSON errors (any ``--json`` on the line), verbosity (-v/-q)."""

    json_errors = False
    verbosity = 0     # -1 quiet, 0 default, 1 -v, 2 -vv


run = _Run()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xfer {xfer.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, show_default=False,
                                         help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only "
                                        "(daemons: no per-request lines).")] = False,
) -> None:
    # With a callback the app stays a group even when main() leaves it one command.
    run.verbosity = -1 if quiet else min(verbose, 2)
    logging.getLogger().setLevel(log_level(logging.WARNING))


def log_level(default: int) -> int:
    """``default`` moved by -v (one step down per v) or -q (ERROR, or WARNING for a daemon)."""
    if run.verbosity < 0:
        return max(default + 10, logging.WARNING) if default < logging.WARNING else logging.ERROR
    return max(logging.DEBUG, default - 10 * run.verbosity)


NetnsOpt = Annotated[str | None, typer.Option("--netns", help="Network namespace of the device "
                                              "(default: the current one).", metavar="NS")]
VmOpt = Annotated[str, typer.Option("--vm", help="VM addresses (IPv4, IPv6, MAC; comma-separated) "
                                    "or an inventory name.", metavar="ADDR[,ADDR...]")]
KindsOpt = Annotated[str, typer.Option("--kinds", help="Kinds of state: conntrack,dhcp,counters,rules.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ZoneOpt = Annotated[int | None, typer.Option("--zone", help="Only this conntrack zone.")]
MarkOpt = Annotated[int | None, typer.Option("--mark", help="Only entries whose mark & MASK == MARK.")]
MaskOpt = Annotated[int, typer.Option("--mask", help="Mask for --mark.")]
KeyOpt = Annotated[Path | None, typer.Option("--key-file", help="HMAC key to sign/verify bundles "
                                             "(default: $XFER_BUNDLE_KEY_FILE).")]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit ``code`` with one line on stderr: ``xfer: message``, or with --json
    ``{"error": message, "exit": code}``."""
    if run.json_errors:
        sys.stderr.write(json.dumps({"error": message, "exit": code}) + "\n")
    else:
        sys.stderr.write(f"xfer: {message}\n")
    raise SystemExit(code)


@contextmanager
def progress(description: str, total: float | None = None) -> Iterator[Any]:
    """A progress bar on stderr while long work runs, only when stderr is a terminal (silent
    when piped or under --json). Yields ``advance(n=1)``.

        with progress("bench conntrack", total=3) as advance:
            for scenario in scenarios: run(scenario); advance()
    """
    if run.json_errors or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


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
