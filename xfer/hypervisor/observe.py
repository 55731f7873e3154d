"""Observer mode: send the migration message when the guest stops, without owning the window.

For hosts where someone else owns ``pause-before-switchover`` — libvirt enables it
itself and sends ``migrate-continue`` as soon as QEMU reaches ``pre-switchover``
— a third party on a second QMP monitor can only watch. The observer waits for
a STOP event whose run state says "stopped for migration" (``finish-migrate``,
or ``postmigrate`` if the migration already finished), sends the message, and
reports whether the migration completed before the manager answered: then the
destination may have run without the state for that long. Ordering is NOT
guaranteed here; ``xfer.hypervisor.hook`` is the path that guarantees it.

    report = asyncio.run(observe("/run/xfer/libvirt/vm1.qmp", opts))
    report.to_dict()["unordered_ms"]   # > 0: the state arrived after the switchover
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from xfer.errors import XferError
from xfer.hypervisor import window
from xfer.hypervisor.hook import HookOptions, Notify, announce, announced_answer, preconnect
from xfer.hypervisor.qmp import QmpClient, QmpEvent
from xfer.hypervisor.report import WindowReport
from xfer.net.notify import ManagerLink

# Run states of a guest stopped by a migration, as opposed to a user's `stop` ("paused").
MIGRATION_STOPPED = frozenset({"finish-migrate", "postmigrate"})


async def observe(qmp_path: str, opts: HookOptions, notify: Notify | None = None,
                  on_ready: Callable[[], None] | None = None,
                  on_arrival: Callable[[dict[str, Any]], None] | None = None) -> WindowReport:
    """Wait for the guest to stop for a migration, send the message(s), report the race.

    With ``opts.incoming`` (a destination that received the VM, see ``arrive``)
    first send its "in" once the VM arrived; ``on_arrival`` gets what happened.
    ``on_ready`` is called once connected (the CLI says so in its log).
    """
    async with QmpClient(qmp_path) as qmp, ManagerLink(opts.manager, opts.ssl_context) as link:
        if notify is None:
            await preconnect(link, len(opts.messages()))
            notify = link.send
        since = len(qmp.events)
        if on_ready is not None:
            on_ready()
        if opts.incoming:
            arrived = await arrive(qmp, opts, notify, since)
            if on_arrival is not None:
                on_arrival(arrived)
            since = len(qmp.events)
        # pre-copy: "migrating" once the migration is active, when the destination is known
        # (then only the last delta is late, not the whole state)
        announced = (asyncio.ensure_future(announce(qmp, opts, since, notify))
                     if opts.migrating() is not None else None)
        try:
            stop = await _migration_stop(qmp, opts.wait_s)
        except BaseException:
            if announced is not None:
                await announced_answer(announced, opts.vm)
            raise
        report = WindowReport(opts.vm, outcome="observed", stop=stop.timestamp)
        deadline = time.monotonic() + opts.deadline_s - max(0.0, time.time() - stop.timestamp)
        started = time.perf_counter()
        try:
            for message in opts.messages():
                report.manager.append(await notify(message, deadline))
            report.transfer_s = time.perf_counter() - started
        except XferError as exc:
            report.outcome, report.error = "observed-failed", str(exc)
        report.ended = time.time()
        report.status = await window.wait_finished(qmp, since, opts.finish_s)
        done = next((e for e in qmp.events[since:] if e.name == "MIGRATION"
                     and e.data.get("status") == "completed"), None)
        report.switchover = done.timestamp if done else None
        if announced is not None:
            report.precopy = await announced_answer(announced, opts.vm)
        return report


async def arrive(qmp: QmpClient, opts: HookOptions, notify: Notify, since: int) -> dict[str, Any]:
    """On the destination of a migration: wait until the VM has arrived, send its "in".

    A libvirt source does not know the destination, so its "out" only deposits the
    state in the manager's store; this "in", naming this server, has it imported
    here. Arrived = the incoming migration completed or the guest runs here. Like
    the source's observer this is not ordered with the guest's resume: the
    answer's ``late_ms`` says how long the guest ran before the state was in.
    A failed "in" is reported, not raised: the observer goes on watching.
    """
    status = (await qmp.execute("query-status"))["status"]
    if status != "running":
        async with window.within(opts.wait_s, "the VM did not arrive"):
            await qmp.wait_event(lambda e: e.name == "RESUME" or (
                e.name == "MIGRATION" and e.data.get("status") == "completed"), None, since)
    message = opts.arrival()
    started = time.perf_counter()
    out: dict[str, Any] = {"vm": opts.vm, "message": message.to_json()}
    try:
        out["answer"] = await notify(message, time.monotonic() + opts.deadline_s)
        out["outcome"] = "in-sent"
    except XferError as exc:
        out["outcome"], out["error"] = "in-failed", str(exc)
    out["ms"] = round((time.perf_counter() - started) * 1000, 3)
    resumed = next((e.timestamp for e in qmp.events[since:] if e.name == "RESUME"), None)
    out["late_ms"] = round(max(0.0, time.time() - resumed) * 1000, 3) if resumed else None
    return out


async def _migration_stop(qmp: QmpClient, timeout: float | None) -> QmpEvent:
    since = len(qmp.events)
    async with window.within(timeout, "the guest did not stop for a migration"):
        while True:
            stop = await qmp.wait_event(lambda e: e.name == "STOP", None, since)
            since = qmp.events.index(stop) + 1
            if (await qmp.execute("query-status"))["status"] in MIGRATION_STOPPED:
                return stop
