"""``xfer qemu-hook`` and ``xfer qemu-migrate``: the pause window of a QEMU migration."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from xfer.cli.common import (
    JsonOpt,
    app,
    fail,
    print_json,
)
from xfer.errors import UsageError

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
PrecopyOpt = Annotated[bool, typer.Option("--precopy/--no-precopy", help="Send \"migrating\" when "
                                           "QEMU reports the migration active, so the manager "
                                           "stages the state before the pause and only the last "
                                           "delta moves in it (not in store mode).")]
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
    from xfer.model import parse_kinds
    from xfer.net.message import Mode
    from xfer.net.tls import client_tls

    extra: dict[str, Any] = {"source": source} if source else {}
    return HookOptions(vm=vm, manager=manager, destination=destination, deadline_s=deadline_ms / 1000,
                       on_fail=on_fail, kinds=tuple(k.value for k in parse_kinds(kinds)) if kinds else None,
                       mode=Mode.of(mode) if mode else None, ssl_context=client_tls(*tls), **extra, **kw)


def _window_report(report: Any, as_json: bool) -> None:
    if as_json:
        print_json(report.to_dict())
    else:
        for line in report.lines():
            typer.echo(line, err=not report.ok and line.startswith("  reason"))
    if not report.ok:
        fail(f"{report.vm}: {report.to_dict()['meaning']}"
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
    incoming: Annotated[bool, typer.Option("--incoming", help="With --observe, on the destination "
                                           "of a migration (libvirt): once the VM has arrived, "
                                           "send \"in\" naming this server (--from), then observe "
                                           "as usual.")] = False,
    precopy: PrecopyOpt = True,
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

    if incoming and not observe:
        raise UsageError("--incoming goes with --observe (a destination only watches)")
    opts = _hook_options(vm, manager, source, destination, deadline_ms, on_fail, kinds, mode,
                         (cacert, cert, key), wait_s=wait_s, incoming=incoming, precopy=precopy)

    def ready() -> None:
        what = "arrival, then its migration stop" if incoming else "migration stop"
        sys.stderr.write(f"xfer: watching {qmp} for {vm}'s {what} (observer)\n")
        sys.stderr.flush()

    def arrived(event: dict[str, Any]) -> None:
        sys.stderr.write(f"xfer: {json.dumps(event, default=str)}\n")
        sys.stderr.flush()

    run = (observer.observe(qmp, opts, on_ready=ready, on_arrival=arrived) if observe
           else hook.run_hook(qmp, opts))
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
    precopy: PrecopyOpt = True,
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
                         (cacert, cert, key), precopy=precopy)
    _window_report(hook.run_sync(migrate.run_migration(src_qmp, dst_qmp, uri, opts)), as_json)
