"""One migration from message to cleanup: plan, move (by mode), commit or roll back, clean up.

Rules (DESIGN.md, reliability):
- the source keeps its state until every destination device has committed;
  then, with ``cleanup: delete``, the source devices forget it (after the
  answer: deleting is not the paused VM's business); with ``age-out`` nothing
  is deleted and the entries time out on their own;
- a failing destination, or an abort, rolls back what was imported at the
  destinations and leaves the source as it was;
- each step is a journal phase, so a restarted manager knows what was under way
  (``recover``).

A message is acted on by an ``Entry``: its task, and for the device-driven
variant (store semantics, message heard on the multicast group) the ``Round`` of
device reports it waits for. Copies of a message (``messages.dedupe_key``) join
the entry of the first instead of acting again. Store semantics apply to "out"
in store mode and to an "out" without destination; "in" collects whatever the
VM has in the store, whatever the mode. Who does the work of each half follows
from how that half's message came: over HTTP or unicast UDP the manager drives
the devices; heard on the multicast group, the devices act themselves.

    migrator = Migrator(topo, client, journal, store, Settings())
    report = await migrator.handle(parse({"vm": "vm1", "indication": "not-running", "direction": "out",
                                          "source": "hv1", "destination": "hv2", "mode": "relay"}))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from xfer.agent.protocol import MIGRATION
from xfer.errors import AgentError, StoreExpired, UsageError, XferError
from xfer.manager import modes
from xfer.manager import precopy as precopy_mod
from xfer.manager.journal import Journal, Migration
from xfer.manager.messages import Message, dedupe_key, kinds_of
from xfer.manager.plan import Plan, Route, resolve, select
from xfer.manager.rounds import Key, Round
from xfer.manager.store import Store
from xfer.manager.topology import Device, Topology
from xfer.model import Kind, VmIdentity

log = logging.getLogger("xfer.manager")
DEFAULT_BUDGET_MS = 300.0   # QEMU's default downtime limit
# A late abort (the hook gave up on a migration the manager then committed) comes
# within seconds; an older commit is where the VM runs now and must not be undone.
ABORT_WINDOW_S = 60.0
# How long the device-driven variant waits for the devices' own deposits and imports.
DEFAULT_DEVICE_TIMEOUT_S = 10.0
# A "migrating" this soon after the VM's "not-running" belongs to the migration that just
# switched over (the hook sends it just before the window: the two crossed); it must not
# stage state for a VM no longer leaving. A new migration of the VM cannot start this soon.
LATE_MIGRATING_S = 2.0
PAUSE_RECORD_DELAY_S = 0.2


class MigrationFailed(XferError):
    """A migration could not be done; its destinations were rolled back (``report`` says how)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        self.report = report
        super().__init__(message)


class Conflict(UsageError):
    """A migration of that VM is already under way, or a device's request (device-driven
    variant) does not fit where its migration stands."""


@dataclass(frozen=True)
class Settings:
    mode: str = "relay"
    cleanup: str = "delete"          # delete | age-out
    budget_ms: float = DEFAULT_BUDGET_MS
    device_timeout_s: float = DEFAULT_DEVICE_TIMEOUT_S
    # pre-copy: seconds between change rounds, and how long a prepared migration waits
    # for its "not-running" before its staged state is removed
    precopy_interval_s: float = precopy_mod.DEFAULT_INTERVAL_S
    precopy_expire_s: float = precopy_mod.DEFAULT_EXPIRE_S

    def __post_init__(self) -> None:
        if self.mode not in modes.MODES:
            raise UsageError(f"mode {self.mode!r} is not one of {', '.join(modes.MODES)}")
        if self.cleanup not in ("delete", "age-out"):
            raise UsageError(f"cleanup {self.cleanup!r} must be delete or age-out")
        if not self.device_timeout_s > 0:
            raise UsageError("device_timeout_s must be a positive number of seconds")
        if not (self.precopy_interval_s > 0 and self.precopy_expire_s > 0):
            raise UsageError("precopy_interval_s and precopy_expire_s must be positive numbers of seconds")


@dataclass(eq=False)
class Entry:
    """One message being acted on (or lately acted on); copies of the message join it."""

    msg: Message
    work: str                       # deposit | collect | move
    driver: str                     # manager | devices
    started: float                  # perf_counter when the message came: the report's ms count from it
    prior: Entry | None = None      # the deposit under way that this collect waits for
    task: asyncio.Task[dict[str, Any]] | None = None
    round: Round | None = None      # device-driven: the reports awaited
    # Set once devices can be told their part (at once for work the manager drives).
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    key: str = ""
    memory_s: float = 0.0
    forget_at: float = math.inf     # monotonic; after it a copy counts as a new message


class Migrator:
    """Runs migrations; one at a time per VM. ``devices`` is the agent client."""

    def __init__(self, topo: Topology, devices: modes.Devices, journal: Journal, store: Store,
                 settings: Settings, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.topo, self.devices, self.journal, self.store, self.settings = (
            topo, devices, journal, store, settings)
        self.active: dict[str, Entry] = {}      # VM -> the entry acting on it now
        self.rounds: dict[int, Round] = {}      # migration -> device reports awaited now
        self._seen: dict[str, Entry] = {}       # dedupe key -> entry (copies join it)
        self._background: set[asyncio.Task[Any]] = set()
        self._cleaning: set[int] = set()   # migrations whose source is being cleaned
        self._aborting: set[str] = set()   # VMs whose migration under way was asked to abort
        self._switched: dict[str, float] = {}  # VM -> when its last "not-running" out came
        self.abort_grace_s = 30.0
        self._on_record = on_record or (lambda r: None)
        self.precopy = precopy_mod.Precopy(devices, interval_s=settings.precopy_interval_s,  # type: ignore[arg-type]
                                           expire_s=settings.precopy_expire_s,
                                           on_expired=self._precopy_expired)

    # --- entry points ----------------------------------------------------------------------

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
        if msg.indication == "not-running" and msg.direction == "out":
            self._switched[msg.vm] = time.monotonic()
        entry, copy = self.accept(msg, budget_ms, transport)
        if entry is None:
            # "in" with nothing stored, outside store mode: the move happened on "out".
            return self._status(msg.vm)
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
        run = {("move", "manager"): self._move, ("deposit", "manager"): self._deposit,
               ("deposit", "devices"): self._deposit_by_devices,
               ("collect", "manager"): self._collect, ("collect", "devices"): self._collect_by_devices,
               }[(entry.work, entry.driver)]
        task = asyncio.ensure_future(run(entry, budget_ms or self.settings.budget_ms))
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
            work = "deposit" if mode == "store" or not msg.destination else "move"
        else:
            # "in" collects what the VM has in the store, whatever the mode (a libvirt
            # destination does not know how the source sent it).
            prior = current if current is not None and current.work == "deposit" else None
            if prior is None and self.journal.latest(msg.vm, ("stored",)) is None:
                if mode == "store":
                    raise UsageError(f"no stored bundles of VM {msg.vm}: was \"out\" sent (store mode)?")
                return None
            work = "collect"
        if current is not None and current is not prior:
            raise Conflict(f"a migration of VM {msg.vm} is already under way")
        # The device-driven variant is the store's: other modes heard on the group are the manager's.
        driver = "devices" if transport == "multicast" and work != "move" else "manager"
        entry = Entry(msg, work, driver, time.perf_counter(), prior)
        if driver == "manager":
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
            self.journal.finish(session.migration, "aborted", "aborted by request")
            return {"ok": True, "vm": vm, "aborted": True, "was": "prepared",
                    "migration": session.migration, **result}
        if entry is not None and entry.task is not None:
            task = entry.task
            self._aborting.add(vm)
            # Device reports are not requests of ours that an abort could overtake: stop
            # waiting for them now (a destination reporting later is told to undo its import).
            for e in (entry, entry.prior):
                if e is not None and e.round is not None:
                    e.round.abort(_Aborted("aborted by request"))
            try:
                await asyncio.wait_for(asyncio.shield(task), self.abort_grace_s)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, XferError):
                    await task
            except (XferError, asyncio.CancelledError):
                pass
            finally:
                self._aborting.discard(vm)
            return {"ok": True, "vm": vm, "aborted": True, "was": "under way"}
        pending = self.journal.latest(vm, ("committed", "stored"), ("committed",))
        if pending is not None and time.time() - pending.started > ABORT_WINDOW_S:
            pending = None
        if pending is None:
            raise UsageError(f"no migration of VM {vm} to abort (none under way, none awaiting cleanup)")
        if pending.id in self._cleaning:
            # Rolling the destinations back now would leave the VM's state nowhere.
            raise UsageError(f"migration {pending.id} of VM {vm} committed and its source is being "
                             "cleaned: too late to abort")
        plan = self._plan_of(pending)
        ident = VmIdentity.from_dict(pending.vm_identity)
        step = self._stepper(pending.id)
        if pending.state == "committed":
            with self._naming(pending.id):
                await self._rollback(plan, ident, step, _all_destinations(plan))
        self.store.drop(pending.id)
        self.journal.finish(pending.id, "aborted", "aborted by request")
        return {"ok": True, "vm": vm, "aborted": True, "was": pending.state, "migration": pending.id}

    async def wait_background(self) -> None:
        """Wait for cleanups under way (stop, tests)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # --- the moves ----------------------------------------------------------------------------

    def _prepare(self, msg: Message, mode: str, budget_ms: float) -> tuple[VmIdentity, Plan, int]:
        ident = self.topo.vm(msg.vm)
        kinds = kinds_of(msg)
        plan = select(self.topo, msg.source, msg.destination, kinds)
        if kinds and plan.missing:
            raise UsageError("cannot move " + "; ".join(plan.missing.values()))
        if not plan.routes:
            raise UsageError("nothing to move: " + ("; ".join(plan.missing.values()) or "no kinds"))
        mid = self.journal.begin(msg.vm, ident.to_dict(), msg.source, msg.destination, mode,
                                 plan.to_dict(), budget_ms)
        # This migration's task (and the tasks it starts) name it in every agent request.
        MIGRATION.set(self.journal.token(mid))
        return ident, plan, mid

    async def prepare(self, msg: Message, budget_ms: float | None) -> dict[str, Any]:
        """"migrating": stage the VM's conntrack state at its destinations now (pre-copy);
        returns once the whole copy is staged, changes keep flowing until "not-running"."""
        started = time.perf_counter()
        mode = msg.mode or self.settings.mode
        if msg.vm in self.active:
            raise Conflict(f"a migration of VM {msg.vm} is already under way")
        switched = self._switched.get(msg.vm)
        if switched is not None and time.monotonic() - switched < LATE_MIGRATING_S:
            # it crossed its own "not-running" on the way (a migration of a few milliseconds)
            raise Conflict(f"VM {msg.vm} was switched over {time.monotonic() - switched:.1f} s ago: "
                           "\"migrating\" came too late to pre-copy")
        ident, plan, mid = self._prepare(msg, mode, budget_ms or self.settings.budget_ms)
        self.journal.state(mid, "prepared")
        pid = self.journal.phase(mid, "precopy", "manager", [Kind.CONNTRACK.value])
        try:
            session = await self.precopy.open(msg.vm, ident, plan, mode, self.journal.token(mid), mid)
        except XferError as exc:
            self.journal.end_phase(pid, "failed", {"error": str(exc)})
            self.journal.finish(mid, "failed", str(exc))
            raise MigrationFailed(f"pre-copy of VM {msg.vm} failed (nothing left staged): {exc}",
                                  {"ok": False, "vm": msg.vm, "migration": mid, "error": str(exc)}) from None
        self.journal.end_phase(pid, "ok", {"precopy": session.summary()})
        return {"ok": True, "vm": msg.vm, "migration": mid, "state": "prepared", "mode": mode,
                "precopy": session.summary(), "ms": round((time.perf_counter() - started) * 1000, 3)}

    async def _precopy_expired(self, session: precopy_mod.Session) -> None:
        self.journal.finish(session.migration, "aborted",
                            f"no \"not-running\" within {self.settings.precopy_expire_s:g} s")

    async def _move(self, entry: Entry, budget_ms: float) -> dict[str, Any]:
        msg = entry.msg
        mode = msg.mode or self.settings.mode
        ident, plan, mid = self._prepare(msg, mode, budget_ms)
        step = self._stepper(mid)
        move = {"relay": modes.relay, "push": modes.push, "pull": modes.pull}[mode]
        session = self.precopy.get(msg.vm)
        if session is not None and session.mode != mode:
            await self.precopy.abort(msg.vm)
            self.journal.finish(session.migration, "aborted", f"\"not-running\" came in mode {mode}")
            session = None
        work = (move(self.devices, plan, ident, step) if session is None
                else precopy_mod.move_with(self.precopy, session, self.devices, plan, ident, step, move))
        if session is not None:
            # From here this migration's journal entry covers what was staged: a manager that
            # dies now rolls back its destinations, pre-copied state included.
            self.journal.finish(session.migration, "continued", f"continued by migration {mid}")
        outcome = await self._guarded(mid, plan, ident, step, work, msg.vm)
        return self._commit(mid, plan, ident, outcome, entry.started)

    # Store semantics: "out" fills the store (deposit), "in" empties it (collect); each half
    # is driven by the manager or by the devices themselves.

    async def _deposit(self, entry: Entry, budget_ms: float) -> dict[str, Any]:
        async def by_manager(mid: int, plan: Plan, ident: VmIdentity, step: modes.Step) -> dict[str, int]:
            bundles = await modes.export_all(self.devices, plan, ident, step)
            for device, data in bundles.items():
                self.store.put(mid, device, data)
            return {d: len(b) for d, b in bundles.items()}

        return await self._fill_store(entry, budget_ms, by_manager)

    async def _deposit_by_devices(self, entry: Entry, budget_ms: float) -> dict[str, Any]:
        async def by_devices(mid: int, plan: Plan, ident: VmIdentity, step: modes.Step) -> dict[str, int]:
            rnd = self._open_round(entry, mid, "out", ident,
                                   {(d.id, ""): tuple(k) for d, k in plan.by_source().items()})
            results = await self._await_round(rnd, step, "deposit")
            failed = [str(r) for r in results.values() if isinstance(r, BaseException)]
            if failed:
                raise XferError("; ".join(failed))
            return {src: int(r.get("bytes", 0)) for (src, _), r in results.items() if isinstance(r, dict)}

        return await self._fill_store(entry, budget_ms, by_devices)

    async def _fill_store(self, entry: Entry, budget_ms: float,
                          fill: Callable[[int, Plan, VmIdentity, modes.Step], Awaitable[dict[str, int]]],
                          ) -> dict[str, Any]:
        """Journal the migration, let ``fill`` put each source device's bundle in the store."""
        msg = entry.msg
        ident, plan, mid = self._prepare(msg, "store", budget_ms)
        try:
            sizes = await fill(mid, plan, ident, self._stepper(mid))
            if msg.vm in self._aborting:
                raise _Aborted("aborted by request")
        except BaseException as exc:
            self.store.drop(mid)
            # An abort also shows as the devices' reports failing with its reason.
            aborted = isinstance(exc, asyncio.CancelledError | _Aborted) or msg.vm in self._aborting
            self.journal.finish(mid, "aborted" if aborted else "failed", str(exc) or "aborted")
            if not isinstance(exc, XferError) or isinstance(exc, asyncio.CancelledError):
                raise
            what = "was aborted" if aborted else f"failed: {exc}"
            raise MigrationFailed(f"migration {mid} of VM {msg.vm} {what}; nothing stored, the source "
                                  "keeps its state", self._report(mid, plan, None)) from None
        finally:
            self._close_round(mid)
        self.journal.state(mid, "stored")
        return {**self._report(mid, plan, entry.started), "stored": sizes, "driven_by": entry.driver}

    async def _collect(self, entry: Entry, budget_ms: float) -> dict[str, Any]:
        def by_manager(mid: int, plan: Plan, ident: VmIdentity, step: modes.Step) -> Awaitable[modes.Outcome]:
            return modes.import_all(self.devices, plan, ident, self.store.get(mid), step)

        return await self._empty_store(entry, by_manager)

    async def _collect_by_devices(self, entry: Entry, budget_ms: float) -> dict[str, Any]:
        async def by_devices(mid: int, plan: Plan, ident: VmIdentity, step: modes.Step) -> modes.Outcome:
            pairs = modes.pairs(plan)
            rnd = self._open_round(entry, mid, "in", ident, {(s.id, d.id): k for s, d, k in pairs})
            results = await self._await_round(rnd, step, "collect")
            return modes.outcome_of(pairs, [results[(s.id, d.id)] for s, d, _ in pairs])

        return await self._empty_store(entry, by_devices)

    async def _empty_store(self, entry: Entry,
                           move: Callable[[int, Plan, VmIdentity, modes.Step], Awaitable[modes.Outcome]],
                           ) -> dict[str, Any]:
        """Once the deposit is in, import the stored bundles at the destinations (``move``), commit."""
        await self._after(entry)
        stored, plan = self._stored_for(entry.msg)
        mid, ident, step = stored.id, VmIdentity.from_dict(stored.vm_identity), self._stepper(stored.id)
        MIGRATION.set(self.journal.token(mid))
        try:
            outcome = await self._guarded(mid, plan, ident, step, move(mid, plan, ident, step), entry.msg.vm)
        finally:
            self._close_round(mid)
        self.store.drop(mid)
        return self._commit(mid, plan, ident, outcome, entry.started)

    async def _after(self, entry: Entry) -> None:
        """Wait for the deposit that ``entry`` (a collect) follows, if it is still under way."""
        prior = entry.prior
        if prior is None or prior.task is None:
            return
        try:
            await asyncio.shield(prior.task)
        except XferError as exc:
            raise UsageError(f"nothing to collect: the \"out\" of VM {entry.msg.vm} failed: {exc}") from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            raise UsageError(f"nothing to collect: the \"out\" of VM {entry.msg.vm} was aborted") from None

    def _stored_for(self, msg: Message) -> tuple[Migration, Plan]:
        """The VM's stored migration that "in" completes, its plan resolved to the destination.

        Refuses an "in" that contradicts the "out" (another source or destination), and
        fails the migration when its bundles expired.
        """
        stored = self.journal.latest(msg.vm, ("stored",))
        if stored is None:
            raise UsageError(f"no stored bundles of VM {msg.vm}: was \"out\" sent (store mode)?")
        if msg.source and msg.source != stored.source:
            raise UsageError(f"the stored bundles of VM {msg.vm} came from {stored.source}, not {msg.source}")
        plan = self._plan_of(stored)
        if not plan.destination:
            # The source did not know the destination (libvirt): "in" names it.
            plan = resolve(plan, self.topo, msg.destination)
            self.journal.resolve(stored.id, msg.destination, plan.to_dict())
        elif msg.destination != plan.destination:
            raise UsageError(f"VM {msg.vm} was announced to {plan.destination}, not {msg.destination}")
        needed = {r.source.id for r in plan.routes}
        if not needed <= self.store.devices(stored.id):
            self.journal.finish(stored.id, "failed", "stored bundles expired")
            raise StoreExpired(f"the stored bundles of VM {msg.vm} expired ({self.store.ttl_s:g} s after "
                               "\"out\"); nothing imported, the source keeps its state")
        if not plan.routes:
            self.journal.finish(stored.id, "failed", "nothing to import")
            raise UsageError("nothing to import: " + "; ".join(plan.missing.values()))
        return stored, plan

    # --- the device-driven variant: rounds of device reports -------------------------------------

    def _open_round(self, entry: Entry, mid: int, direction: str, ident: VmIdentity,
                    expected: dict[Key, tuple[Kind, ...]]) -> Round:
        """Await reports from the devices, and let them learn their part (``role``)."""
        rnd = Round(mid, direction, ident, expected, self.journal.token(mid))
        self.rounds[mid] = rnd
        entry.round = rnd
        entry.ready.set()
        if entry.msg.vm in self._aborting:
            rnd.abort(_Aborted("aborted by request"))
        return rnd

    def _close_round(self, mid: int) -> None:
        rnd = self.rounds.pop(mid, None)
        if rnd is not None:
            rnd.close()

    async def _await_round(self, rnd: Round, step: modes.Step, phase: str) -> dict[Key, Any]:
        """Each awaited report (a journal phase per device) or the error instead: a device's
        own failure, or not reporting within ``device_timeout_s``."""
        timeout = self.settings.device_timeout_s

        async def one(key: Key) -> Any:
            return await step(phase, self.topo.devices[key[1] or key[0]], rnd.kinds[key],
                              lambda: rnd.waiting[key])

        tasks = {key: asyncio.ensure_future(one(key)) for key in rnd.waiting}
        try:
            await asyncio.wait(tasks.values(), timeout=timeout)
        finally:
            for t in tasks.values():
                t.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        results: dict[Key, Any] = {}
        for key, t in tasks.items():
            device = key[1] or key[0]
            if t.cancelled():
                what = "deposit its bundle" if phase == "deposit" else f"import {key[0]}'s bundle"
                results[key] = AgentError(f"{device} did not {what} within {timeout:g} s (is its agent "
                                          "in the multicast group, with [manager] configured?)")
            elif t.exception() is not None:
                results[key] = AgentError(f"{device}: {t.exception()}")
            else:
                results[key] = t.result()
        return results

    async def _guarded(self, mid: int, plan: Plan, ident: VmIdentity, step: modes.Step,
                       work: Awaitable[modes.Outcome], vm: str) -> modes.Outcome:
        """Run the move; on a failure, an abort or a cancel, roll the destinations back."""
        try:
            outcome = await work
            if vm in self._aborting:
                raise _Aborted("aborted by request")
            if not outcome.ok:
                raise XferError("; ".join(f"{d.id} ({','.join(k)}): {why}"
                                          for _, d, k, why in outcome.failed))
            return outcome
        except BaseException as exc:
            # Shielded: a cancel must not interrupt its own rollback.
            await asyncio.shield(self._rollback(plan, ident, step, _all_destinations(plan)))
            aborted = isinstance(exc, asyncio.CancelledError | _Aborted)
            self.journal.finish(mid, "aborted" if aborted else "rolled-back", str(exc) or "aborted")
            if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, XferError):
                raise
            what = "was aborted" if aborted else f"failed and was rolled back: {exc}"
            raise MigrationFailed(f"migration {mid} of VM {vm} {what}",
                                  self._report(mid, plan, None)) from None

    def _commit(self, mid: int, plan: Plan, ident: VmIdentity, outcome: modes.Outcome,
                started: float) -> dict[str, Any]:
        self.journal.state(mid, "committed")
        report = self._report(mid, plan, started)
        # the pause's cost as the hypervisor sees it: message received -> answer sent; a
        # record for `xfer migrations`, written once the answer is out (not in the pause)
        report["pause_ms"], report["precopy"] = report["ms"], outcome.precopy
        asyncio.get_running_loop().call_later(PAUSE_RECORD_DELAY_S, self._journal_pause, mid,
                                              report["ms"], outcome.precopy)
        if self.settings.cleanup == "delete":
            task = asyncio.ensure_future(self._cleanup(mid, plan, ident))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            report["cleanup"] = "pending"
        else:
            self.journal.finish(mid, "committed")
            report["cleanup"] = "age-out"
        self._on_record(report)
        return report

    def _journal_pause(self, mid: int, ms: float | None, precopy: dict[str, int] | None) -> None:
        pid = self.journal.phase(mid, "pause", "manager", [])
        self.journal.end_phase(pid, "ok", {"pause_ms": ms, "precopy": precopy})

    async def _cleanup(self, mid: int, plan: Plan, ident: VmIdentity) -> None:
        """Forget the VM at the source devices: only ever called once every destination committed."""
        self._cleaning.add(mid)
        try:
            errors = await modes.forget(self.devices, _all_sources(plan), ident, self._stepper(mid),
                                        "cleanup")
            self.journal.finish(mid, "cleaned" if not errors else "committed", "; ".join(errors) or None)
        finally:
            self._cleaning.discard(mid)

    async def _rollback(self, plan: Plan, ident: VmIdentity, step: modes.Step,
                        targets: dict[Device, set[Kind]]) -> list[str]:
        errors = await modes.forget(self.devices, targets, ident, step, "rollback")
        for e in errors:
            log.error(json.dumps({"event": "rollback failed", "error": e}))
        return errors

    # --- recovery ----------------------------------------------------------------------------

    async def recover(self) -> list[dict[str, Any]]:
        """Finish or roll back what a previous run left under way. Run before serving.

        - started (transfer under way): roll back the destinations; the source still has it all;
        - committed (cleanup pending): finish the cleanup;
        - stored (store mode between "out" and "in"): kept while its bundles last.
        """
        done = []
        self.store.expire()
        for m in self.journal.unfinished():
            try:
                plan = self._plan_of(m)
            except XferError as exc:
                self.journal.finish(m.id, "failed", f"cannot recover: {exc}")
                done.append({"migration": m.id, "vm": m.vm, "action": "failed", "error": str(exc)})
                continue
            with self._naming(m.id):
                action = await self._recover_one(m, plan)
            done.append({"migration": m.id, "vm": m.vm, "was": m.state, "action": action})
        return done

    async def _recover_one(self, m: Migration, plan: Plan) -> str:
        ident = VmIdentity.from_dict(m.vm_identity)
        if m.state == "committed":
            if self.settings.cleanup == "delete":
                await self._cleanup(m.id, plan, ident)
            else:
                self.journal.finish(m.id, "committed")
            return "finished cleanup"
        if m.state == "stored" and self.store.devices(m.id):
            return "kept stored bundles"
        errors = await self._rollback(plan, ident, self._stepper(m.id), _all_destinations(plan))
        self.store.drop(m.id)
        self.journal.finish(m.id, "rolled-back", "; ".join(["manager restarted", *errors]))
        return "rolled back"

    # --- helpers --------------------------------------------------------------------------------

    def _plan_of(self, m: Migration) -> Plan:
        """Rebuild a journaled plan against the current topology's devices."""
        plan = Plan(m.source, m.destination,
                    missing={Kind(k): why for k, why in m.plan.get("missing", {}).items()})
        devices = self.topo.devices
        for r in m.plan.get("routes", []):
            also = tuple(devices[d] for d in r.get("also_held_by", ()) if d in devices)
            try:
                plan.routes.append(Route(Kind(r["kind"]), devices[r["source"]],
                                         tuple(devices[d] for d in r["destinations"]), also))
            except KeyError as exc:
                raise UsageError(f"device {exc} of migration {m.id} is no longer in the topology") from None
        return plan

    @contextlib.contextmanager
    def _naming(self, mid: int) -> Iterator[None]:
        """Agent requests made meanwhile, from this task, name migration ``mid``."""
        token = MIGRATION.set(self.journal.token(mid))
        try:
            yield
        finally:
            MIGRATION.reset(token)

    def _stepper(self, mid: int) -> modes.Step:
        journal = self.journal

        async def step(name: str, device: Device, kinds: Sequence[Kind],
                       op: Callable[[], Awaitable[Any]]) -> Any:
            pid = journal.phase(mid, name, device.id, [k.value for k in kinds])
            try:
                result = await op()
            except BaseException as exc:
                journal.end_phase(pid, "aborted" if isinstance(exc, asyncio.CancelledError) else "failed",
                                  {"error": str(exc)})
                raise
            detail = ({"bytes": len(result)} if isinstance(result, bytes)
                      else _summary(result) if isinstance(result, dict) else {})
            ok = not isinstance(result, dict) or name in ("cleanup", "rollback") or modes.report_ok(
                result.get("report", result) if name == "push" else result)
            journal.end_phase(pid, "ok" if ok else "failed", detail)
            return result

        return step

    def _report(self, mid: int, plan: Plan, started: float | None) -> dict[str, Any]:
        m = self.journal.get(mid)
        ms = (time.perf_counter() - started) * 1000 if started is not None else None
        phases: list[dict[str, Any]] = [
            {"name": p.name, "device": p.device, "kinds": list(p.kinds), "outcome": p.outcome,
             "ms": None if p.ms is None else round(p.ms, 3)} for p in m.phases]
        per_device: dict[str, float] = {}
        for p in m.phases:
            per_device[p.device] = per_device.get(p.device, 0.0) + (p.ms or 0.0)
        return {"ok": True, "migration": mid, "vm": m.vm, "mode": m.mode, "source": m.source,
                "destination": m.destination, "state": m.state,
                "ms": None if ms is None else round(ms, 3), "budget_ms": m.budget_ms,
                "over_budget": ms is not None and ms > m.budget_ms,
                "device_ms": {d: round(v, 3) for d, v in per_device.items()},
                "phases": phases, "missing": {k.value: w for k, w in plan.missing.items()},
                "also_held_by": {k.value: [d.id for d in devs] for k, devs in plan.also_held_by().items()}}

    def _status(self, vm: str) -> dict[str, Any]:
        for m in self.journal.recent(20):
            if m.vm == vm:
                return {"ok": True, "vm": vm, "migration": m.id, "state": m.state, "note":
                        f"\"in\" needs no action in {m.mode} mode"}
        return {"ok": True, "vm": vm, "note": "no migration of this VM known; \"in\" needs no action"}


class _Aborted(XferError):
    """An abort arrived while the migration's device requests were under way."""


def _all_destinations(plan: Plan) -> dict[Device, set[Kind]]:
    return {d: set(k) for d, k in plan.destinations().items()}


def _all_sources(plan: Plan) -> dict[Device, set[Kind]]:
    return {d: set(k) for d, k in plan.by_source().items()}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("created", "updated", "skipped", "failed", "bytes", "exported", "ok")
    return {k: result[k] for k in keep if k in result}
