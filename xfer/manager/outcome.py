"""What becomes of a migration: journaled phases, then commit (and clean the source up) or
roll the destinations back, and the report that says which.

Rules (docs/architecture.md, reliability rules):
- the source keeps its state until every destination device has committed;
  then, with ``cleanup: delete``, the source devices forget it (after the
  answer: deleting is not the paused VM's business); with ``age-out`` nothing
  is deleted and the entries time out on their own;
- a failing destination, or an abort, rolls back what was imported at the
  destinations and leaves the source as it was;
- each step is a journal phase, so a restarted manager knows what was under way.

    outcomes = Outcomes(topo, devices, journal, settings)
    ident, plan, mid = outcomes.prepare(msg, Mode.RELAY, 300.0)
    step = outcomes.stepper(mid)
    result = await outcomes.guarded(mid, plan, ident, step, modes.relay(devices, plan, ident, step), msg.vm)
    report = outcomes.commit(mid, plan, ident, result, started)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from xfer.agent.protocol import MIGRATION
from xfer.errors import MigrationFailed, UsageError, XferError
from xfer.manager import modes
from xfer.manager.journal import Journal, Migration
from xfer.manager.plan import Plan, Route, select
from xfer.manager.settings import Cleanup, Settings
from xfer.manager.topology import Device, Topology
from xfer.model import Kind, VmIdentity
from xfer.net.message import Message, Mode, kinds_of

log = logging.getLogger("xfer.manager")


class Aborted(XferError):
    """An abort arrived while the migration's device requests were under way."""


class Outcomes:
    """Journal, commit, clean up and roll back migrations; ``devices`` is the agent client."""

    def __init__(self, topo: Topology, devices: modes.Devices, journal: Journal, settings: Settings,
                 on_record: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.topo, self.devices, self.journal, self.settings = topo, devices, journal, settings
        self.aborting: set[str] = set()    # VMs whose migration under way was asked to abort
        self.cleaning: set[int] = set()    # migrations whose source is being cleaned
        self._background: set[asyncio.Task[Any]] = set()
        self._on_record = on_record or (lambda r: None)

    def prepare(self, msg: Message, mode: Mode, budget_ms: float) -> tuple[VmIdentity, Plan, int]:
        """Plan the message's move and journal the migration; its task names it from now on."""
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

    async def guarded(self, mid: int, plan: Plan, ident: VmIdentity, step: modes.Step,
                      work: Awaitable[modes.Outcome], vm: str) -> modes.Outcome:
        """Run the move; on a failure, an abort or a cancel, roll the destinations back."""
        try:
            outcome = await work
            if vm in self.aborting:
                raise Aborted("aborted by request")
            if not outcome.ok:
                raise XferError("; ".join(f"{d.id} ({','.join(k)}): {why}"
                                          for _, d, k, why in outcome.failed))
            return outcome
        except BaseException as exc:
            # Shielded: a cancel must not interrupt its own rollback.
            await asyncio.shield(self.rollback(plan, ident, step, all_destinations(plan)))
            aborted = isinstance(exc, asyncio.CancelledError | Aborted)
            self.journal.finish(mid, "aborted" if aborted else "rolled-back", str(exc) or "aborted")
            if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, XferError):
                raise
            what = "was aborted" if aborted else f"failed and was rolled back: {exc}"
            raise MigrationFailed(f"migration {mid} of VM {vm} {what}",
                                  self.report(mid, plan, None)) from None

    def commit(self, mid: int, plan: Plan, ident: VmIdentity, outcome: modes.Outcome,
               started: float) -> dict[str, Any]:
        """Every destination committed: journal it, start the source's cleanup, report."""
        self.journal.state(mid, "committed")
        report = self.report(mid, plan, started)
        if self.settings.cleanup == Cleanup.DELETE:
            task = asyncio.ensure_future(self.cleanup(mid, plan, ident))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            report["cleanup"] = "pending"
        else:
            self.journal.finish(mid, "committed")
            report["cleanup"] = "age-out"
        self._on_record(report)
        return report

    async def cleanup(self, mid: int, plan: Plan, ident: VmIdentity) -> None:
        """Forget the VM at the source devices: only ever called once every destination committed."""
        self.cleaning.add(mid)
        try:
            errors = await modes.forget(self.devices, all_sources(plan), ident, self.stepper(mid),
                                        "cleanup")
            self.journal.finish(mid, "cleaned" if not errors else "committed", "; ".join(errors) or None)
        finally:
            self.cleaning.discard(mid)

    async def rollback(self, plan: Plan, ident: VmIdentity, step: modes.Step,
                       targets: dict[Device, set[Kind]]) -> list[str]:
        """Forget what was imported at ``targets``; returns the errors (logged, not raised)."""
        errors = await modes.forget(self.devices, targets, ident, step, "rollback")
        for e in errors:
            log.error(json.dumps({"event": "rollback failed", "error": e}))
        return errors

    async def wait_background(self) -> None:
        """Wait for cleanups under way (stop, tests)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def plan_of(self, m: Migration) -> Plan:
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
    def naming(self, mid: int) -> Iterator[None]:
        """Agent requests made meanwhile, from this task, name migration ``mid``."""
        token = MIGRATION.set(self.journal.token(mid))
        try:
            yield
        finally:
            MIGRATION.reset(token)

    def stepper(self, mid: int) -> modes.Step:
        """The step function of migration ``mid``: each device operation is one journal phase."""
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

    def report(self, mid: int, plan: Plan, started: float | None) -> dict[str, Any]:
        """The migration's report: state, timing against the budget, each phase."""
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


def all_destinations(plan: Plan) -> dict[Device, set[Kind]]:
    return {d: set(k) for d, k in plan.destinations().items()}


def all_sources(plan: Plan) -> dict[Device, set[Kind]]:
    return {d: set(k) for d, k in plan.by_source().items()}


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("created", "updated", "skipped", "failed", "bytes", "exported", "ok")
    return {k: result[k] for k in keep if k in result}
