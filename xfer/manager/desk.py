"""What the devices' own requests do in the device-driven variant (the manager's side).

An agent that heard a migration message on the multicast group asks the manager
for its part, then deposits, collects and reports; each request names the
device, and the server lets only that device's certificate make it.

    role(device, message)            -> {"role": "source", "migration", "vm", "kinds", "done"}
                                     |  {"role": "destination", "migration", "vm",
                                     |   "collect": [{"source", "kinds"}], "done"}
                                     |  {"role": "none", ...}
    deposit(migration, device, packed)        a source's bundle into the store
    stored_bundle(migration, source, device)  a source's bundle for a destination
    report(migration, device, body)           {"source", "report"}: a destination's import;
                                              {"source"?, "error"}: either side's failure

The role request carries the message as the agent heard it, and counts as the
manager hearing it (the same dedupe key as the datagram): whichever of the two
arrives first starts the migration, the other joins it. For "in" the answer waits
until the deposit is complete.

    desk = DeviceDesk(migrator)
    await desk.role("fw-b", {"vm": "vm1", "indication": "starting", "direction": "in", ...})
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from xfer.errors import AgentError, StoreExpired, UsageError
from xfer.manager.migration import Conflict, Migrator
from xfer.manager.rounds import Key, Round
from xfer.net import message


class DeviceDesk:
    """The device-facing half of the device-driven variant, over a ``Migrator``."""

    def __init__(self, migrator: Migrator) -> None:
        self.migrator = migrator

    async def role(self, device: str, body: Any) -> dict[str, Any]:
        """What ``device`` is to do about the message it heard (see the module docstring)."""
        m = self.migrator
        msg = message.parse(body)
        if msg.indication == "abort" or device not in m.topo.devices:
            return {"role": "none", "vm": msg.vm}
        entry, _ = m.accept(msg, None, "multicast")
        if entry is None or entry.task is None:
            return {"role": "none", "vm": msg.vm, "note": "nothing to do for this message"}
        ready = asyncio.ensure_future(entry.ready.wait())
        try:
            await asyncio.wait({ready, entry.task}, timeout=m.settings.device_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
        if not entry.ready.is_set():
            if not entry.task.done():
                raise AgentError(f"the manager could not tell {device} its part within "
                                 f"{m.settings.device_timeout_s:g} s (the deposit is not complete)")
            if entry.task.cancelled():
                raise UsageError(f"the migration of VM {msg.vm} was aborted")
            entry.task.result()   # raises the reason the migration could not start
        if entry.round is None:
            return {"role": "none", "vm": msg.vm, "note": "the manager drives this migration"}
        return entry.round.role_of(device)

    def deposit(self, migration: int, device: str, packed: bytes, size: int) -> dict[str, Any]:
        """A source device's bundle (as it travels, ``size`` bytes inflated) into the store."""
        key = (device, "")
        rnd = self._round(migration, "out", key, f"a deposit from {device}")
        if not rnd.awaits(key):
            if self._reported_ok(rnd, key):
                return {"ok": True, "migration": migration, "duplicate": True}
            raise Conflict(self._not_waiting(migration, f"a deposit from {device}"))
        self.migrator.store.put_raw(migration, device, packed)
        rnd.report(key, {"bytes": size})
        return {"ok": True, "migration": migration, "bytes": size}

    def stored_bundle(self, migration: int, source: str, device: str) -> bytes:
        """The bundle ``source`` deposited, for destination ``device`` to import (as it travels)."""
        key = (source, device)
        rnd = self._round(migration, "in", key, f"{device} to collect {source}'s bundle")
        if not rnd.awaits(key):
            raise Conflict(self._not_waiting(migration, f"{device} to collect {source}'s bundle"))
        packed = self.migrator.store.get_raw(migration, source)
        if packed is None:
            raise StoreExpired(f"the stored bundle of {source} for migration {migration} expired "
                               f"({self.migrator.store.ttl_s:g} s after its deposit); nothing imported")
        return packed

    def report(self, migration: int, device: str, body: Any) -> dict[str, Any]:
        """A destination's import report, or a device's failure; Conflict when it no longer counts."""
        if not isinstance(body, dict):
            raise UsageError("a device report must be a JSON object")
        source = str(body.get("source") or "")
        rnd = self.migrator.rounds.get(migration)
        key = (source, device) if rnd is not None and rnd.direction == "in" else (device, "")
        what = f"{device}'s report" + (f" on {source}'s bundle" if source else "")
        rnd = self._round(migration, None, key, what)
        error, report = body.get("error"), body.get("report")
        if error:
            done = rnd.report(key, error=AgentError(str(error)[:500]))
        elif rnd.direction == "in" and isinstance(report, dict):
            done = rnd.report(key, report)
        else:
            raise UsageError("a device report needs an \"error\", or (destination) a \"report\" object")
        if not done:
            raise Conflict(self._not_waiting(migration, what))
        return {"ok": True, "migration": migration}

    # --- helpers --------------------------------------------------------------------------

    def _round(self, migration: int, direction: str | None, key: Key, what: str) -> Round:
        rnd = self.migrator.rounds.get(migration)
        if rnd is None or (direction and rnd.direction != direction) or key not in rnd.kinds:
            raise Conflict(self._not_waiting(migration, what))
        return rnd

    @staticmethod
    def _reported_ok(rnd: Round, key: Key) -> bool:
        fut = rnd.waiting[key]
        return fut.done() and not fut.cancelled() and fut.exception() is None

    def _not_waiting(self, migration: int, what: str) -> str:
        try:
            state = self.migrator.journal.get(migration).state
        except KeyError:
            return f"no migration {migration}"
        return f"migration {migration} is not waiting for {what} (it is {state})"
