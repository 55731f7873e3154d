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

    migrator = Migrator(topo, client, journal, store, Settings())
    report = await migrator.handle({"vm": "vm1", "indication": "not-running", "direction": "out",
                                    "source": "hv1", "destination": "hv2", "mode": "relay"})
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xfer.errors import UsageError, XferError
from xfer.manager import modes
from xfer.manager.journal import Journal, Migration
from xfer.manager.messages import Message, kinds_of
from xfer.manager.plan import Plan, Route, select
from xfer.manager.store import Store
from xfer.manager.topology import Device, Topology
from xfer.model import Kind, VmIdentity

log = logging.getLogger("xfer.manager")
DEFAULT_BUDGET_MS = 300.0   # QEMU's default downtime limit
# A late abort (the hook gave up on a migration the manager then committed) comes
# within seconds; an older commit is where the VM runs now and must not be undone.
ABORT_WINDOW_S = 60.0


class MigrationFailed(XferError):
    """A migration could not be done; its destinations were rolled back (``report`` says how)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        self.report = report
        super().__init__(message)


class Conflict(UsageError):
    """A migration of that VM is already under way."""


@dataclass(frozen=True)
class Settings:
    mode: str = "relay"
    cleanup: str = "delete"          # delete | age-out
    budget_ms: float = DEFAULT_BUDGET_MS

    def __post_init__(self) -> None:
        if self.mode not in modes.MODES:
            raise UsageError(f"mode {self.mode!r} is not one of {', '.join(modes.MODES)}")
        if self.cleanup not in ("delete", "age-out"):
            raise UsageError(f"cleanup {self.cleanup!r} must be delete or age-out")


class Migrator:
    """Runs migrations; one at a time per VM. ``devices`` is the agent client."""

    def __init__(self, topo: Topology, devices: modes.Devices, journal: Journal, store: Store,
                 settings: Settings, on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.topo, self.devices, self.journal, self.store, self.settings = (
            topo, devices, journal, store, settings)
        self.active: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._cleaning: set[int] = set()   # migrations whose source is being cleaned
        self._aborting: set[str] = set()   # VMs whose migration under way was asked to abort
        self.abort_grace_s = 30.0
        self._on_record = on_record or (lambda r: None)

    # --- entry points ----------------------------------------------------------------------

    async def handle(self, msg: Message, budget_ms: float | None = None) -> dict[str, Any]:
        """Act on one migration message; returns the report (raises MigrationFailed, UsageError)."""
        mode = msg.mode or self.settings.mode
        if msg.indication == "abort":
            return await self.abort(msg.vm)
        if mode == "store":
            run = self._deposit if msg.direction == "out" else self._collect
        elif msg.direction == "out":
            run = self._move
        else:
            # "in" in the other modes: the move happened on "out"; say where it stands.
            return self._status(msg.vm)
        if msg.vm in self.active:
            raise Conflict(f"a migration of VM {msg.vm} is already under way")
        task = asyncio.ensure_future(run(msg, mode, budget_ms or self.settings.budget_ms))
        self.active[msg.vm] = task
        try:
            # Shielded: a client that hangs up does not cancel a migration; abort does.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current and current.cancelling()):
                # Aborted by someone else: the sender of the message gets an answer, not a hang-up.
                raise MigrationFailed(f"migration of VM {msg.vm} was aborted; its destinations were "
                                      "rolled back", {"ok": False, "vm": msg.vm, "aborted": True}) from None
            raise
        finally:
            if task.done():
                self.active.pop(msg.vm, None)
            else:
                task.add_done_callback(lambda _: self.active.pop(msg.vm, None))

    async def abort(self, vm: str) -> dict[str, Any]:
        """Stop a migration of ``vm``: roll back its destinations, leave its source as it was.

        A migration under way is not cut short: its device requests finish (an agent
        goes on with a request whose client left, so a rollback sent meanwhile could
        be overtaken by the import it meant to undo), then it rolls back instead of
        committing. Only after ``abort_grace_s`` is it cancelled outright.
        """
        task = self.active.get(vm)
        if task is not None:
            self._aborting.add(vm)
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
        return ident, plan, mid

    async def _move(self, msg: Message, mode: str, budget_ms: float) -> dict[str, Any]:
        started = time.perf_counter()
        ident, plan, mid = self._prepare(msg, mode, budget_ms)
        step = self._stepper(mid)
        move = {"relay": modes.relay, "push": modes.push, "pull": modes.pull}[mode]
        outcome = await self._guarded(mid, plan, ident, step, move(self.devices, plan, ident, step),
                                      msg.vm)
        return self._commit(mid, plan, ident, outcome, started)

    async def _deposit(self, msg: Message, mode: str, budget_ms: float) -> dict[str, Any]:
        started = time.perf_counter()
        ident, plan, mid = self._prepare(msg, mode, budget_ms)
        step = self._stepper(mid)
        try:
            bundles = await modes.export_all(self.devices, plan, ident, step)
        except BaseException as exc:
            self.journal.finish(mid, "failed" if isinstance(exc, Exception) else "aborted", str(exc))
            raise
        for device, data in bundles.items():
            self.store.put(mid, device, data)
        self.journal.state(mid, "stored")
        return {**self._report(mid, plan, started), "stored": {d: len(b) for d, b in bundles.items()}}

    async def _collect(self, msg: Message, mode: str, budget_ms: float) -> dict[str, Any]:
        started = time.perf_counter()
        stored = self.journal.latest(msg.vm, ("stored",))
        if stored is None:
            raise UsageError(f"no stored bundles of VM {msg.vm}: was \"out\" sent (store mode)?")
        mid, plan = stored.id, self._plan_of(stored)
        ident = VmIdentity.from_dict(stored.vm_identity)
        bundles = self.store.get(mid)
        if set(bundles) != set(d.id for d in plan.by_source()):
            self.journal.finish(mid, "failed", "stored bundles expired")
            raise UsageError(f"the stored bundles of VM {msg.vm} expired; nothing imported")
        step = self._stepper(mid)
        outcome = await self._guarded(mid, plan, ident, step,
                                      modes.import_all(self.devices, plan, ident, bundles, step), msg.vm)
        self.store.drop(mid)
        return self._commit(mid, plan, ident, outcome, started)

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
            ident = VmIdentity.from_dict(m.vm_identity)
            step = self._stepper(m.id)
            if m.state == "committed":
                if self.settings.cleanup == "delete":
                    await self._cleanup(m.id, plan, ident)
                else:
                    self.journal.finish(m.id, "committed")
                action = "finished cleanup"
            elif m.state == "stored" and self.store.get(m.id):
                action = "kept stored bundles"
            else:
                errors = await self._rollback(plan, ident, step, _all_destinations(plan))
                self.store.drop(m.id)
                self.journal.finish(m.id, "rolled-back", "; ".join(["manager restarted", *errors]))
                action = "rolled back"
            done.append({"migration": m.id, "vm": m.vm, "was": m.state, "action": action})
        return done

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
