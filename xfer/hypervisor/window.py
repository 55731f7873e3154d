"""QEMU's pause-before-switchover window, as QMP commands: arm, wait, end, disarm.

With the migration capability ``pause-before-switchover`` the source stops the
guest (STOP event), enters status ``pre-switchover`` and waits there until it is
told ``migrate-continue {"state": "pre-switchover"}``, or ``migrate_cancel``
(after which the source guest runs again). The destination cannot resume before
that, so whatever happens in between happens while the VM runs nowhere. No
policy here (what to send, when to cancel): see ``xfer.hypervisor.hook``.

    armed = await arm(qmp)
    opened = await wait_for_window(qmp, since=armed.since, timeout=None)
    await continue_migration(qmp)
    status = await wait_finished(qmp, since=armed.since, timeout=30)
    await disarm(qmp, armed)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from xfer.errors import HypervisorError
from xfer.hypervisor.qmp import QmpClient, QmpEvent

PAUSE = "pause-before-switchover"
EVENTS = "events"
PRE_SWITCHOVER = "pre-switchover"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
# Statuses in which QEMU refuses migrate-set-capabilities (a migration is under way).
RUNNING = frozenset({"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug",
                     "postcopy-active", "postcopy-paused", "postcopy-recover", "colo"})


@dataclass(frozen=True)
class Armed:
    """What ``arm`` changed (to undo it) and where in the event list the migration starts."""

    previous: dict[str, bool]
    since: int


@contextlib.asynccontextmanager
async def within(timeout: float | None, what: str) -> AsyncIterator[None]:
    """``asyncio.timeout`` whose expiry is a ``HypervisorError`` saying ``what`` did not happen."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError as exc:
        raise HypervisorError(f"{what} within {timeout} s") from exc


async def capabilities(qmp: QmpClient) -> dict[str, bool]:
    """Migration capabilities and their states (``query-migrate-capabilities``)."""
    return {c["capability"]: bool(c["state"]) for c in await qmp.execute("query-migrate-capabilities")}


async def migration_status(qmp: QmpClient) -> str:
    """The current (or last) migration's status, ``"none"`` before the first one."""
    return str((await qmp.execute("query-migrate")).get("status", "none"))


async def guest_running(qmp: QmpClient) -> bool:
    return bool((await qmp.execute("query-status"))["running"])


async def set_capabilities(qmp: QmpClient, wanted: dict[str, bool]) -> None:
    if wanted:
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": name, "state": state} for name, state in wanted.items()]})


async def arm(qmp: QmpClient, pause: bool = True) -> Armed:
    """Enable ``events`` (and ``pause-before-switchover``) before the migration starts.

    Fails when QEMU lacks the capability (before 2.11), or when a migration is
    already running without it: its window can no longer be owned.
    """
    caps = await capabilities(qmp)
    if pause and PAUSE not in caps:
        raise HypervisorError(f"this QEMU has no {PAUSE} capability (needs QEMU 2.11 or later)")
    wanted = {EVENTS: True, **({PAUSE: True} if pause else {})}
    change = {name: state for name, state in wanted.items() if caps.get(name) != state}
    since = len(qmp.events)
    if change:
        status = await migration_status(qmp)
        if status in RUNNING:
            raise HypervisorError(f"a migration is already under way (status {status}) without "
                                  f"{', '.join(change)}: its pause window cannot be owned now")
        await set_capabilities(qmp, change)
    return Armed({name: caps.get(name, False) for name in change}, since)


async def disarm(qmp: QmpClient, armed: Armed) -> None:
    """Put back what ``arm`` changed; call only once the migration has finished."""
    await set_capabilities(qmp, armed.previous)


async def wait_for_window(qmp: QmpClient, since: int, timeout: float | None,
                          poll_s: float = 0.1) -> float:
    """Wait for ``pre-switchover``; return when QEMU entered it (``time.time()`` scale).

    The MIGRATION event is the fast path; ``query-migrate`` every ``poll_s`` is the
    fallback when events were lost (a reconnect, ``events`` cleared by someone).
    Raises ``HypervisorError`` when the migration ends some other way first.
    """
    started = False

    def relevant(e: QmpEvent) -> bool:
        return e.name == "MIGRATION" and e.data.get("status") in {PRE_SWITCHOVER, *TERMINAL}

    async with within(timeout, "no migration reached its pause window"):
        while True:
            try:
                event = await qmp.wait_event(relevant, poll_s, since)
            except TimeoutError:
                status = await migration_status(qmp)
                if status == PRE_SWITCHOVER:
                    return time.time()
                # A terminal status seen by polling before anything started is the
                # previous migration's, not ours.
                started = started or status in RUNNING
                if started and status in TERMINAL:
                    raise HypervisorError(f"migration ended ({status}) before the pause window") from None
                continue
            if event.data["status"] == PRE_SWITCHOVER:
                return event.timestamp
            raise HypervisorError(f"migration ended ({event.data['status']}) before the pause window")


async def continue_migration(qmp: QmpClient) -> None:
    """End the window forwards: the source sends the last device state, the destination resumes."""
    await qmp.execute("migrate-continue", {"state": PRE_SWITCHOVER})


async def cancel_migration(qmp: QmpClient, timeout: float = 10.0, resume_s: float = 2.0) -> bool:
    """End the window backwards: ``migrate_cancel``; True once the source guest runs again.

    False when it stays stopped (a guest paused before the migration stays paused).
    """
    await qmp.execute("migrate_cancel")
    async with within(timeout, "the migration was not cancelled"):
        while await migration_status(qmp) not in TERMINAL:
            await asyncio.sleep(0.01)
    try:
        async with asyncio.timeout(resume_s):
            while not await guest_running(qmp):
                await asyncio.sleep(0.01)
    except TimeoutError:
        return False
    return True


async def completed_info(qmp: QmpClient, timeout: float = 5.0) -> dict[str, Any]:
    """``query-migrate`` of a completed migration, once its figures are final.

    NOTE: QEMU (7.2) sets status ``completed`` (and sends the event) in the migration
    thread before it computes ``downtime``/``total-time`` under the BQL, at the same
    time as it moves the guest to ``postmigrate``; read before that, downtime is 0.
    """
    async with within(timeout, "the source did not reach postmigrate"):
        while (await qmp.execute("query-status"))["status"] != "postmigrate":
            await asyncio.sleep(0.002)
    return dict(await qmp.execute("query-migrate"))


async def wait_finished(qmp: QmpClient, since: int, timeout: float, poll_s: float = 0.1) -> str:
    """Wait for ``completed``/``failed``/``cancelled`` (event, or polling); return it."""

    def done(e: QmpEvent) -> bool:
        return e.name == "MIGRATION" and e.data.get("status") in TERMINAL

    async with within(timeout, "the migration did not finish"):
        while True:
            try:
                return str((await qmp.wait_event(done, poll_s, since)).data["status"])
            except TimeoutError:
                if (status := await migration_status(qmp)) in TERMINAL:
                    return status
