"""The hook: own the pause window of one migration and move the VM's state inside it.

Policy on top of ``xfer.hypervisor.window``: send the migration message(s) once
the source guest is stopped in ``pre-switchover``, wait for the manager under a
deadline, then end the window — forwards when the state moved; on failure or
deadline backwards (``cancel``: the source guest runs again) or forwards anyway
(``continue``: the VM moves without its state, reported loudly). The window is
ended in a ``finally``, so an error or a SIGTERM never leaves the guest paused; a
window left open by a run that was killed (SIGKILL) is ended by the next run.

    opts = HookOptions(vm="vm1", manager="http://127.0.0.1:8700/migrations",
                       source="hv1", destination="hv2")
    report = asyncio.run(run_hook("/run/vm1/qmp.sock", opts))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from xfer.errors import HypervisorError, UsageError, XferError
from xfer.hypervisor import window
from xfer.hypervisor.qmp import QmpClient
from xfer.hypervisor.report import WindowReport
from xfer.net import DEFAULT_MANAGER_URL
from xfer.net.message import MigrationMessage, Mode, messages_for
from xfer.net.notify import ManagerLink, manager_urls

log = logging.getLogger("xfer.hypervisor")

# Sends one message under a deadline (``time.monotonic()``), returns the manager's report.
# Default: ManagerLink.send over connections opened before the window.
Notify = Callable[[MigrationMessage, float], Awaitable[dict[str, Any]]]
ON_FAIL = ("cancel", "continue")


@dataclass(frozen=True)
class HookOptions:
    """What the hook sends, to whom, and what it does when that fails."""

    vm: str
    manager: str = DEFAULT_MANAGER_URL
    source: str = socket.gethostname()
    destination: str = ""
    deadline_s: float = 1.0          # from the window opening to the manager's answer
    on_fail: str = "cancel"
    kinds: tuple[str, ...] | None = None
    mode: Mode | None = None          # a mode's name is accepted and checked
    wait_s: float | None = None      # for the window to open; None: as long as it takes
    finish_s: float = 30.0           # for the migration to finish once the window ended
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)  # https manager
    incoming: bool = False           # observer on a destination: "in" once the VM arrived (libvirt)
    precopy: bool = True             # "migrating" once QEMU's migration is active (not in store mode)
    precopy_s: float = 30.0          # for the manager to stage the bulk copy

    def messages(self) -> list[MigrationMessage]:
        return messages_for(self.vm, self.source, self.destination, self.kinds, self.mode)

    def migrating(self) -> MigrationMessage | None:
        """The "migrating" message that starts pre-copy, when it applies: a known
        destination, and a mode other than store (which learns it only after the pause)."""
        if not self.precopy or not self.destination or self.mode == "store":
            return None
        return MigrationMessage(self.vm, "migrating", "out", self.source, self.destination,
                                self.kinds, self.mode)

    def arrival(self) -> MigrationMessage:
        """The "in" a destination sends for a VM that arrived from a source it does not
        know (libvirt): this server (``source``, the host the hook runs on) names itself."""
        return MigrationMessage(self.vm, "starting", "in", "", self.source, self.kinds, self.mode)

    def __post_init__(self) -> None:
        if self.on_fail not in ON_FAIL:
            raise UsageError(f"--on-fail must be one of {', '.join(ON_FAIL)}, not {self.on_fail!r}")
        if self.deadline_s <= 0:
            raise UsageError("the deadline must be positive")
        manager_urls(self.manager)
        if self.mode is not None:
            object.__setattr__(self, "mode", Mode.of(self.mode))


async def run_hook(qmp_path: str, opts: HookOptions, notify: Notify | None = None) -> WindowReport:
    """Arm the source QEMU, own the next migration's window, report. Ends a stale window first.

    A window already open when we connect belongs to an earlier run that died in
    it: it is ended by the ``on_fail`` policy and that is this run's report.
    """
    async with QmpClient(qmp_path) as qmp:
        if await window.migration_status(qmp) == window.PRE_SWITCHOVER:
            return await end_stale_window(qmp, opts)
        armed = await window.arm(qmp)
        return await own_window(qmp, opts, armed, notify)


async def end_stale_window(qmp: QmpClient, opts: HookOptions) -> WindowReport:
    """End a ``pre-switchover`` window nobody holds any more, by the ``on_fail`` policy."""
    report = WindowReport(opts.vm, error="a pause window was left open by an earlier run")
    log.warning("vm %s: ending a pause window left open by an earlier run (%s)", opts.vm, opts.on_fail)
    since = len(qmp.events)
    await _end(qmp, report, moved=False, on_fail=opts.on_fail)
    if report.outcome == "cancelled":
        await tell_abort(opts)   # the dead run's message may still be moving state
    report.outcome = "stale-" + report.outcome.split("-")[0]
    report.status = await window.wait_finished(qmp, since, opts.finish_s)
    with contextlib.suppress(XferError):
        # The dead run armed it; nothing to restore but that.
        await window.set_capabilities(qmp, {window.PAUSE: False})
    return report


async def own_window(qmp: QmpClient, opts: HookOptions, armed: window.Armed,
                     notify: Notify | None = None) -> WindowReport:
    """From an armed source to a finished migration: wait, hold, end, measure, disarm.

    Whatever happens (error, cancellation), the migration is not left running with
    the capability set and nobody to end its window.
    """
    report = WindowReport(opts.vm)
    announced: asyncio.Task[dict[str, Any] | None] | None = None
    async with ManagerLink(opts.manager, opts.ssl_context) as link:
        try:
            if notify is None:
                await preconnect(link, len(opts.messages()) + (opts.migrating() is not None))
                notify = link.send
            if opts.migrating() is not None:
                announced = asyncio.ensure_future(announce(qmp, opts, armed.since, notify))
            report.opened = await window.wait_for_window(qmp, armed.since, opts.wait_s)
            await hold_window(qmp, opts, report, notify)
            await record_finish(qmp, report, armed.since, opts.finish_s)
        finally:
            await _abandon(qmp, opts, armed, report)
            if announced is not None:
                report.precopy = await announced_answer(announced, opts.vm)
                if report.precopy is not None and report.opened is None:
                    await tell_abort(opts)  # the migration ended before its window: unstage
    return report


async def announce(qmp: QmpClient, opts: HookOptions, since: int, notify: Notify) -> dict[str, Any] | None:
    """Send "migrating" once QEMU reports the migration active: the manager stages the VM's
    conntrack state at the destination while the guest runs (pre-copy), so that only the
    last delta moves in the pause. Returns the manager's answer (None: not sent)."""
    message = opts.migrating()
    assert message is not None

    def begun(e: Any) -> bool:
        return e.name == "MIGRATION" and e.data.get("status") in {"active", window.PRE_SWITCHOVER,
                                                                  *window.TERMINAL}
    event = await qmp.wait_event(begun, None, since)
    if event.data.get("status") != "active" or any(
            e.name == "MIGRATION" and e.data.get("status") == window.PRE_SWITCHOVER
            for e in qmp.events[since:]):
        return None  # the window came first: "migrating" now would only cross "not-running"
    return await notify(message, time.monotonic() + opts.precopy_s)


async def announced_answer(task: asyncio.Task[dict[str, Any] | None], vm: str) -> dict[str, Any] | None:
    """The "migrating" answer, if it came; a pre-copy that failed is no failure of the
    migration (the pause then moves everything)."""
    if not task.done():
        task.cancel()
    try:
        return await task
    except (XferError, OSError, asyncio.CancelledError) as exc:
        if not isinstance(exc, asyncio.CancelledError):
            log.warning("vm %s: pre-copy did not start (%s); the pause moves all the state", vm, exc)
        return None


async def preconnect(link: ManagerLink, count: int) -> None:
    """Handshakes before the window: inside it they would be downtime."""
    await link.open(count)
    if link.open_error:
        log.warning("%s (will try again in the window)", link.open_error)


async def record_finish(qmp: QmpClient, report: WindowReport, since: int, timeout: float) -> None:
    """Wait for the migration to finish; note its status, QEMU's downtime and the STOP time."""
    report.status = await window.wait_finished(qmp, since, timeout)
    if report.status == "completed":
        info = await window.completed_info(qmp)
        report.downtime_ms, report.total_time_ms = info.get("downtime"), info.get("total-time")
    stop = next((e for e in qmp.events[since:] if e.name == "STOP"), None)
    report.stop = stop.timestamp if stop else None


async def hold_window(qmp: QmpClient, opts: HookOptions, report: WindowReport, notify: Notify) -> None:
    """Inside the window: check the guest is stopped, send the messages, end the window."""
    assert report.opened is not None
    moved = False
    try:
        if await window.guest_running(qmp):
            raise HypervisorError("QEMU reports pre-switchover but the guest is running")
        # The deadline counts from QEMU entering the window, not from our noticing it.
        deadline = time.monotonic() + opts.deadline_s - max(0.0, time.time() - report.opened)
        started = time.perf_counter()
        for message in opts.messages():
            report.manager.append(await notify(message, deadline))
        report.transfer_s = time.perf_counter() - started
        moved = True
    except XferError as exc:
        report.error = str(exc)
    finally:
        # Also on CancelledError (SIGTERM, Ctrl-C): the window must end.
        _consume_cancel()
        await _end(qmp, report, moved, opts.on_fail)
        if report.outcome == "cancelled":
            await tell_abort(opts)


async def tell_abort(opts: HookOptions, timeout_s: float = 1.0) -> None:
    """The VM stays at the source: tell the manager to roll back whatever it moved.

    A manager that missed the deadline may still be importing at the destination
    (and, once done, would clean the source of a VM that never left). Best effort,
    after the window has ended: a failure is logged, not raised.
    """
    message = MigrationMessage(opts.vm, "abort", "out", opts.source, opts.destination,
                               opts.kinds, opts.mode)
    try:
        async with ManagerLink(opts.manager, opts.ssl_context) as link:
            await link.send(message, time.monotonic() + timeout_s)
    except (XferError, OSError) as exc:
        log.warning("vm %s: could not tell the manager to abort: %s", opts.vm, exc)


def _consume_cancel() -> None:
    """In a clean-up that runs because the task was cancelled (SIGTERM), take the request
    back: on Python 3.11 ``asyncio.timeout`` turns its own expiry into CancelledError
    while one is pending (``uncancel() == 0`` there; 3.12 compares with the count at
    entry), so the clean-up's QMP waits were cut short and the hook left QEMU's
    pause-before-switchover set. The CancelledError already raised still propagates."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()


async def _end(qmp: QmpClient, report: WindowReport, moved: bool, on_fail: str) -> None:
    # The window ends when QEMU reads the command: note when it was sent; the answer
    # comes after QEMU's own switchover work (device state), which runs without us too.
    report.ended = time.time()
    if moved or on_fail == "continue":
        await window.continue_migration(qmp)
        report.outcome = "moved" if moved else "continued-without-state"
        if not moved:
            log.error("vm %s: MIGRATION CONTINUED WITHOUT NETWORK STATE (%s): its connections, "
                      "DHCP binding and counters did not follow it", report.vm, report.error)
    else:
        if not await window.cancel_migration(qmp):
            report.error = f"{report.error}; the source guest did not run again (paused before?)"
        report.outcome = "cancelled"
        log.warning("vm %s: migration cancelled, the guest runs on the source (%s)",
                    report.vm, report.error)
    report.end_acked = time.time()


async def _abandon(qmp: QmpClient, opts: HookOptions, armed: window.Armed, report: WindowReport) -> None:
    """On the way out: a migration still running with the capability set would stop in a
    window nobody ends, so cancel it (or end its window); then restore the capabilities.
    A migration whose window we already ended forwards is left to finish."""
    _consume_cancel()
    try:
        status = await window.migration_status(qmp)
        if status == window.PRE_SWITCHOVER and report.ended is None:
            await _end(qmp, WindowReport(opts.vm, error="hook exiting"), False, opts.on_fail)
        elif status in window.RUNNING and report.opened is None:
            log.warning("vm %s: hook exiting before the window: cancelling the migration", opts.vm)
            await qmp.execute("migrate_cancel")
        if status in window.RUNNING:
            await window.wait_finished(qmp, armed.since, opts.finish_s)
        await window.disarm(qmp, armed)
    except XferError as exc:
        log.error("vm %s: could not restore QEMU's migration capabilities: %s", opts.vm, exc)


def run_sync(coro: Awaitable[WindowReport]) -> WindowReport:
    """Run a hook coroutine; SIGTERM cancels it so its ``finally`` ends the window."""
    import signal

    async def main() -> WindowReport:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError as exc:
        raise HypervisorError("interrupted (the pause window, if open, was ended)") from exc
