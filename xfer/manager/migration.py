"""One migration from message to answer: accept the message (one at a time per VM, copies
acted on once), run its work, answer; abort on request.

The work is split by job:

    entry.py      what a message asks for (Work) and who does it (Driver)
    outcome.py    journal phases; commit and clean the source up, or roll back; the report
    storeflow.py  store semantics: deposit on "out", collect on "in", by manager or devices
    recovery.py   what a restarted manager does with unfinished migrations
    modes.py      how bundles move between devices (relay, push, pull; store's export/import)

Store semantics apply to "out" in store mode and to an "out" without destination;
"in" collects whatever the VM has in the store, whatever the mode. Who does the
work of each half follows from how that half's message came: over HTTP or unicast
UDP the manager drives the devices; heard on the multicast group, the devices act
themselves.

    migrator = Migrator(topo, client, journal, store, Settings())
    report = await migrator.handle(parse({"vm": "vm1", "indication": "not-running", "direction": "out",
                                          "source": "hv1", "destination": "hv2", "mode": "relay"}))
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from xfer.errors import Conflict, MigrationFailed, UsageError, XferError
from xfer.manager import modes
from xfer.manager import precopy as precopy_mod
from xfer.manager.admission import Admission
from xfer.manager.entry import Driver, Entry, Work
from xfer.manager.journal import Journal
from xfer.manager.outcome import Aborted, Outcomes
from xfer.manager.plan import select
from xfer.manager.recovery import recover
from xfer.manager.rounds import Round
from xfer.manager.settings import Settings
from xfer.manager.store import Store
from xfer.manager.storeflow import StoreFlow, status
from xfer.manager.topology import Topology
from xfer.model import Kind, VmIdentity
from xfer.net.message import Message, Mode, dedupe_key, kinds_of

__all__ = ["Conflict", "MigrationFailed", "Migrator", "Settings"]

# A late abort (the hook gave up on a migration the manager then committed) comes
# within seconds; an older commit is where the VM runs now and must not be undone.
ABORT_WINDOW_S = 60.0
# What a copy of an earlier message is answered with success for (journal states).
_DONE = ("committed", "cleaned", "stored")
# A "migrating" this soon after the VM's "not-running" belongs to the migration that just
# switched over (the hook sends it just before the window: the two crossed); it must not
# stage state for a VM no longer leaving. A new migration of the VM cannot start this soon.
LATE_MIGRATING_S = 2.0
PAUSE_RECORD_DELAY_S = 0.2
_MOVES = {Mode.RELAY: modes.relay, Mode.PUSH: modes.push, Mode.PULL: modes.pull}


class Migrator:
    """Runs migrations; one at a time per VM. ``devices`` is the agent client."""

    def __init__(self, topo: Topology, devices: modes.Devices, journal: Journal, store: Store,
                 settings: Settings, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.topo, self.devices, self.journal, self.store, self.settings = (
            topo, devices, journal, store, settings)
        self.outcomes = Outcomes(topo, devices, journal, settings, on_record)
        self.flow = StoreFlow(self.outcomes, store)
        self.active: dict[str, Entry] = {}      # VM -> the entry acting on it now
        self._seen: dict[str, Entry] = {}       # dedupe key -> entry (copies join it)
        self.abort_grace_s = 30.0
        self._switched: dict[str, float] = {}   # VM -> when its last "not-running" out came
        self.admission = Admission()
        self.precopy = precopy_mod.Precopy(devices, interval_s=settings.precopy_interval_s,  # type: ignore[arg-type]
                                           expire_s=settings.precopy_expire_s,
                                           on_expired=self._precopy_expired)

    @property
    def rounds(self) -> dict[int, Round]:
        """Migration -> the device reports awaited now (device-driven variant)."""
        return self.flow.rounds

    async def handle(self, msg: Message, budget_ms: float | None = None,
                     transport: str = "http") -> dict[str, Any]:
        """Act on one migration message; returns the report (raises MigrationFailed, UsageError).

        ``transport``: http | udp | multicast (heard on the group the agents join: the
        device-driven variant). A copy of a message already acted on gets that message's
        answer, marked ``"duplicate": true``, and changes nothing.
        """
        if msg.indication == "abort":
            return await self.abort(msg.vm)
        if msg.indication == "migrating":
            return await self.prepare(msg, budget_ms)
        dedupe = dedupe_key(msg, transport)
        if dedupe is not None and dedupe[0] not in self._seen:
            # A copy of a message that another manager (before a takeover) or an earlier run
            # acted on: answer with what the journal says, act on nothing.
            earlier = await self.journal.seen(dedupe[0], dedupe[1])
            if earlier is not None and dedupe[0] not in self._seen:
                m = await self.journal.get(earlier)
                report = {"ok": m.state in _DONE, "migration": m.id, "vm": m.vm, "mode": m.mode,
                          "state": m.state, "outcome": m.outcome, "error": m.error, "duplicate": True}
                if m.state not in _DONE:
                    raise MigrationFailed(f"migration {m.id} of VM {m.vm} is {m.state} (this message was "
                                          f"acted on before: {m.error or 'no reason journaled'})", report)
                return report
        if msg.indication == "not-running" and msg.direction == "out":
            self._switched[msg.vm] = time.monotonic()
        entry, copy = self.accept(msg, budget_ms, transport)
        if entry is None:
            # "in" while a move of the VM is under way: the move happened on "out".
            return await status(self.journal, msg.vm)
        report = await self._answer(entry)
        return {**report, "duplicate": True} if copy else report

    def accept(self, msg: Message, budget_ms: float | None, transport: str) -> tuple[Entry | None, bool]:
        """The entry acting on ``msg`` and whether ``msg`` is a copy; starts it when new.

        Synchronous on purpose: copies arriving together (a datagram and an agent's
        role request for it) must find each other.
        """
        now = time.monotonic()
        for key in [k for k, e in self._seen.items() if e.forget_at < now]:
            del self._seen[key]
        dedupe = dedupe_key(msg, transport)
        if dedupe is not None and dedupe[0] in self._seen:
            return self._seen[dedupe[0]], True
        entry = self._entry(msg, transport)
        if entry is None:
            return None, False
        budget = budget_ms or self.settings.budget_ms
        if entry.work == Work.MOVE:
            # refused now (503) rather than queued into a pause it would overrun
            entry.devices = self._devices_of(msg)
            self.admission.check(entry.devices, budget / 1000, self._move_class(msg))
        work = self._move(entry, budget) if entry.work == Work.MOVE else self.flow.run(entry, budget)
        task = asyncio.ensure_future(work)
        entry.task = task
        self.active[msg.vm] = entry
        if dedupe is not None:
            entry.key, entry.memory_s = dedupe
            self._seen[entry.key] = entry
        task.add_done_callback(lambda _: self._finished(entry))
        return entry, False

    def _entry(self, msg: Message, transport: str) -> Entry | None:
        """What a new message asks for (None: nothing to do); Conflict when the VM is busy."""
        mode = msg.mode or self.settings.mode
        current = self.active.get(msg.vm)
        prior = None
        if msg.direction == "out":
            work = Work.DEPOSIT if mode == Mode.STORE or not msg.destination else Work.MOVE
        else:
            # "in" collects what the VM has in the store, whatever the mode (a libvirt
            # destination does not know how the source sent it).
            # Whether anything is stored is the collect's first question (the journal is
            # not asked here: copies arriving together must find each other at once).
            prior = current if current is not None and current.work == Work.DEPOSIT else None
            if prior is None and mode != Mode.STORE and current is not None and current.work == Work.MOVE:
                return None
            work = Work.COLLECT
        if current is not None and current is not prior:
            raise Conflict(f"a migration of VM {msg.vm} is already under way")
        self._no_rollback_pending(msg.vm, "new migration")
        # The device-driven variant is the store's: other modes heard on the group are the manager's.
        driver = Driver.DEVICES if transport == "multicast" and work != Work.MOVE else Driver.MANAGER
        entry = Entry(msg, work, driver, time.perf_counter(), prior,
                      optional=work == Work.COLLECT and prior is None and mode != Mode.STORE)
        if driver == Driver.MANAGER:
            entry.ready.set()
        return entry

    def _finished(self, entry: Entry) -> None:
        if self.active.get(entry.msg.vm) is entry:
            del self.active[entry.msg.vm]
        entry.forget_at = time.monotonic() + entry.memory_s
        assert entry.task is not None
        if not entry.task.cancelled():
            entry.task.exception()   # retrieved: an entry nobody awaits (a role request's) must not warn

    async def _answer(self, entry: Entry) -> dict[str, Any]:
        task, vm = entry.task, entry.msg.vm
        assert task is not None
        try:
            # Shielded: a client that hangs up does not cancel a migration; abort does.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current and current.cancelling()):
                # Aborted by someone else: the sender of the message gets an answer, not a hang-up.
                raise MigrationFailed(f"migration of VM {vm} was aborted; its destinations were "
                                      "rolled back", {"ok": False, "vm": vm, "aborted": True}) from None
            raise

    def _no_rollback_pending(self, vm: str, what: str) -> None:
        """Conflict while a rollback of ``vm`` is pending: landing after a newer import or a
        pre-copy's stage, it would undo it."""
        pending = self.outcomes.pending_of(vm)
        if pending is not None:
            raise Conflict(f"the rollback of migration {pending} of VM {vm} is still pending (a "
                           f"destination could not be reached): no {what} of it until it is done")

    async def prepare(self, msg: Message, budget_ms: float | None) -> dict[str, Any]:
        """"migrating": stage the VM's conntrack state at its destinations now (pre-copy,
        ``xfer.manager.precopy``); returns once the whole copy is staged, changes keep
        flowing until "not-running"."""
        started = time.perf_counter()
        mode = msg.mode or self.settings.mode
        if msg.vm in self.active:
            raise Conflict(f"a migration of VM {msg.vm} is already under way")
        self._no_rollback_pending(msg.vm, "pre-copy")
        switched = self._switched.get(msg.vm)
        if switched is not None and time.monotonic() - switched < LATE_MIGRATING_S:
            # it crossed its own "not-running" on the way (a migration of a few milliseconds)
            raise Conflict(f"VM {msg.vm} was switched over {time.monotonic() - switched:.1f} s ago: "
                           "\"migrating\" came too late to pre-copy")
        out = self.outcomes
        ident, plan, mid = await out.prepare(msg, mode, budget_ms or self.settings.budget_ms)
        await self.journal.state(mid, "prepared")
        pid = await self.journal.phase(mid, "precopy", "manager", [Kind.CONNTRACK.value])
        try:
            session = await self.precopy.open(msg.vm, ident, plan, mode, self.journal.token(mid), mid)
        except XferError as exc:
            await self.journal.end_phase(mid, pid, "failed", {"error": str(exc)})
            await self.journal.finish(mid, "failed", str(exc))
            raise MigrationFailed(f"pre-copy of VM {msg.vm} failed (nothing left staged): {exc}",
                                  {"ok": False, "vm": msg.vm, "migration": mid, "error": str(exc)}) from None
        await self.journal.end_phase(mid, pid, "ok", {"precopy": session.summary()})
        return {"ok": True, "vm": msg.vm, "migration": mid, "state": "prepared", "mode": mode,
                "precopy": session.summary(), "ms": round((time.perf_counter() - started) * 1000, 3)}

    async def _precopy_expired(self, session: precopy_mod.Session) -> None:
        await self.journal.finish(session.migration, "aborted",
                            f"no \"not-running\" within {self.settings.precopy_expire_s:g} s")

    async def _move(self, entry: Entry, budget_ms: float) -> dict[str, Any]:
        """Relay, push or pull: source to destination now, then commit or roll back. After
        pre-copy only the last conntrack delta moves (``precopy.move_with``)."""
        msg, out = entry.msg, self.outcomes
        mode = msg.mode or self.settings.mode
        ident, plan, mid = await out.prepare(msg, mode, budget_ms, entry.key)
        step = out.stepper(mid)
        move = _MOVES[mode]
        session = self.precopy.get(msg.vm)
        if session is not None and session.mode != mode:
            await self.precopy.abort(msg.vm)
            await self.journal.finish(session.migration, "aborted", f"\"not-running\" came in mode {mode}")
            session = None
        if session is not None:
            # From here this migration's journal entry covers what was staged: a manager that
            # dies now rolls back its destinations, pre-copied state included.
            await self.journal.finish(session.migration, "continued", f"continued by migration {mid}")
        work = (move(self.devices, plan, ident, step) if session is None
                else precopy_mod.move_with(self.precopy, session, self.devices, plan, ident, step, move))
        async with self.admission.slot(entry.devices, "precopy" if session is not None else "full"):
            outcome = await out.guarded(mid, plan, ident, step, work, msg.vm)
        report = await out.commit(mid, plan, ident, outcome, entry.started)
        # the pause's cost as the hypervisor sees it: message received -> answer sent; a
        # record for `xfer migrations`, written once the answer is out (not in the pause)
        report["pause_ms"], report["precopy"] = report["ms"], outcome.precopy
        out.background(self._journal_pause(mid, report["ms"], outcome.precopy))
        return report

    def _move_class(self, msg: Message) -> str:
        """Which running mean predicts this move: a pre-copied VM's is the last delta only."""
        session = self.precopy.get(msg.vm)
        same = session is not None and session.mode == (msg.mode or self.settings.mode)
        return "precopy" if same else "full"

    def _devices_of(self, msg: Message) -> list[str]:
        """The devices a move of ``msg`` would use (for admission; [] when it cannot plan)."""
        try:
            plan = select(self.topo, msg.source, msg.destination, kinds_of(msg))
        except XferError:
            return []
        return sorted({d.id for d in plan.by_source()} | {d.id for d in plan.destinations()})

    async def _journal_pause(self, mid: int, ms: float | None, precopy: dict[str, int] | None) -> None:
        await asyncio.sleep(PAUSE_RECORD_DELAY_S)      # after the answer, out of the pause
        pid = await self.journal.phase(mid, "pause", "manager", [])
        await self.journal.end_phase(mid, pid, "ok", {"pause_ms": ms, "precopy": precopy})

    async def abort(self, vm: str) -> dict[str, Any]:
        """Stop a migration of ``vm``: roll back its destinations, leave its source as it was.

        A migration under way is not cut short: its device requests finish (an agent
        goes on with a request whose client left, so a rollback sent meanwhile could
        be overtaken by the import it meant to undo), then it rolls back instead of
        committing. Only after ``abort_grace_s`` is it cancelled outright.
        """
        entry = self.active.get(vm)
        session = self.precopy.get(vm)
        if session is not None and (entry is None or entry.task is None):
            # prepared, "not-running" not come: remove what was staged
            result = await self.precopy.abort(vm)
            await self.journal.finish(session.migration, "aborted", "aborted by request")
            return {"ok": True, "vm": vm, "aborted": True, "was": "prepared",
                    "migration": session.migration, **result}
        if entry is not None and entry.task is not None:
            await self._abort_under_way(entry)
            return {"ok": True, "vm": vm, "aborted": True, "was": "under way"}
        out = self.outcomes
        pending = await self.journal.latest(vm, ("committed", "stored"), ("committed",))
        if pending is not None and time.time() - pending.started > ABORT_WINDOW_S:
            pending = None
        if pending is None:
            raise UsageError(f"no migration of VM {vm} to abort (none under way, none awaiting cleanup)")
        if pending.id in out.cleaning:
            # Rolling the destinations back now would leave the VM's state nowhere.
            raise UsageError(f"migration {pending.id} of VM {vm} committed and its source is being "
                             "cleaned: too late to abort")
        plan = out.plan_of(pending)
        await self.store.drop(pending.id)
        if pending.state == "committed":
            with out.naming(pending.id):
                done = await out.roll_back(pending.id, plan, VmIdentity.from_dict(pending.vm_identity), vm,
                                           "aborted", "aborted by request")
            if not done:
                return {"ok": True, "vm": vm, "aborted": True, "was": pending.state, "migration": pending.id,
                        "state": "rollback-pending", "note": "a destination could not be reached: its "
                        "rollback is retried in the background"}
        else:
            await self.journal.finish(pending.id, "aborted", "aborted by request")
        return {"ok": True, "vm": vm, "aborted": True, "was": pending.state, "migration": pending.id}

    async def _abort_under_way(self, entry: Entry) -> None:
        vm, task = entry.msg.vm, entry.task
        assert task is not None
        self.outcomes.aborting.add(vm)
        # Device reports are not requests of ours that an abort could overtake: stop
        # waiting for them now (a destination reporting later is told to undo its import).
        for e in (entry, entry.prior):
            if e is not None and e.round is not None:
                e.round.abort(Aborted("aborted by request"))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.abort_grace_s)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, XferError):
                await task
        except (XferError, asyncio.CancelledError):
            pass
        finally:
            self.outcomes.aborting.discard(vm)

    async def recover(self) -> list[dict[str, Any]]:
        """Finish or roll back what a previous run left under way (``recovery.recover``)."""
        return await recover(self.outcomes, self.store)

    async def wait_background(self) -> None:
        """Wait for cleanups under way (stop, tests)."""
        await self.outcomes.wait_background()

