"""Drive a whole QEMU live migration with the hook in its pause window.

The destination QEMU must have been started with ``-incoming defer`` so that its
capabilities can be set before it listens. Order: arm both sides (``events``;
the source also ``pause-before-switchover``), ``migrate-incoming`` on the
destination, ``migrate`` on the source, then the hook owns the window exactly as
``xfer qemu-hook`` does. Because this driver watches both sides, its report also
has the guest gap: source STOP to destination RESUME, from QEMU's own timestamps.

    opts = HookOptions(vm="vm1", manager=url, source="hv1", destination="hv2")
    report = asyncio.run(run_migration("/run/src.qmp", "/run/dst.qmp",
                                       "tcp:127.0.0.1:4444", opts))
"""

from __future__ import annotations

import contextlib

from xfer.errors import HypervisorError, XferError
from xfer.hypervisor import hook, window
from xfer.hypervisor.qmp import QmpClient
from xfer.hypervisor.report import WindowReport


async def run_migration(src_path: str, dst_path: str, uri: str, opts: hook.HookOptions,
                        notify: hook.Notify | None = None,
                        use_hook: bool = True) -> WindowReport:
    """Migrate from the QEMU at ``src_path`` to the one at ``dst_path`` over ``uri``.

    ``use_hook=False`` migrates without owning the window (the benchmark's baseline).
    """
    async with QmpClient(src_path) as src, QmpClient(dst_path) as dst:
        if await window.migration_status(src) == window.PRE_SWITCHOVER:
            return await hook.end_stale_window(src, opts)
        dst_status = (await dst.execute("query-status"))["status"]
        if dst_status != "inmigrate":
            raise HypervisorError(f"destination is {dst_status!r}, not waiting for a migration "
                                  "(start it with -incoming defer)")
        dst_armed = await window.arm(dst, pause=False)
        armed = await window.arm(src, pause=use_hook)
        owned = False
        try:
            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            owned = True  # from here own_window/_unhooked restore the source's capabilities
            report = await (hook.own_window(src, opts, armed, notify) if use_hook
                            else _unhooked(src, opts, armed))
            if report.status == "completed":
                report.resume = await _destination_resumed(dst, dst_armed.since, opts.finish_s)
            return report
        finally:
            if not owned:
                with contextlib.suppress(XferError):
                    await window.disarm(src, armed)
            # The destination QEMU exits after a cancelled migration; nothing to restore then.
            with contextlib.suppress(XferError):
                await window.disarm(dst, dst_armed)


async def _unhooked(src: QmpClient, opts: hook.HookOptions, armed: window.Armed) -> WindowReport:
    report = WindowReport(opts.vm, outcome="unhooked")
    try:
        await hook.record_finish(src, report, armed.since, opts.finish_s)
    finally:
        await window.disarm(src, armed)
    return report


async def _destination_resumed(dst: QmpClient, since: int, timeout: float) -> float:
    """When the destination guest resumed (RESUME event); ``cont`` it if it was started -S."""
    await window.wait_finished(dst, since, timeout)
    if not await window.guest_running(dst) and dst.last_event("RESUME") is None:
        await dst.execute("cont")
    async with window.within(timeout, "the destination guest did not resume"):
        event = await dst.wait_event(lambda e: e.name == "RESUME", None, since)
    return event.timestamp
