"""Store semantics: "out" fills the manager's store (deposit), "in" empties it into the
destination devices (collect). Each half is driven by the manager, or — the device-driven
variant, its message heard on the multicast group — by the devices themselves, whose
reports the manager awaits in a ``Round``.

    flow = StoreFlow(outcomes, store)
    report = await flow.run(entry, budget_ms)      # entry.work: DEPOSIT or COLLECT
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from xfer.agent.protocol import MIGRATION
from xfer.errors import AgentError, MigrationFailed, StoreExpired, UsageError, XferError
from xfer.manager import modes
from xfer.manager.entry import Driver, Entry, Work
from xfer.manager.journal import Migration
from xfer.manager.outcome import Aborted, Outcomes
from xfer.manager.plan import Plan, resolve
from xfer.manager.rounds import Key, Round
from xfer.manager.store import Store
from xfer.model import Kind, VmIdentity
from xfer.net.message import Message, Mode


class StoreFlow:
    """Deposits and collections through the store; ``rounds`` are the device reports awaited now."""

    def __init__(self, outcomes: Outcomes, store: Store) -> None:
        self.outcomes, self.store = outcomes, store
        self.journal, self.devices, self.topo = outcomes.journal, outcomes.devices, outcomes.topo
        self.rounds: dict[int, Round] = {}      # migration -> device reports awaited now

    def run(self, entry: Entry, budget_ms: float) -> Awaitable[dict[str, Any]]:
        """The work of a DEPOSIT or COLLECT entry, by its driver."""
        by = {(Work.DEPOSIT, Driver.MANAGER): self._deposit,
              (Work.DEPOSIT, Driver.DEVICES): self._deposit_by_devices,
              (Work.COLLECT, Driver.MANAGER): self._collect,
              (Work.COLLECT, Driver.DEVICES): self._collect_by_devices}
        return by[(entry.work, entry.driver)](entry, budget_ms)

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
        msg, aborting = entry.msg, self.outcomes.aborting
        ident, plan, mid = self.outcomes.prepare(msg, Mode.STORE, budget_ms)
        try:
            sizes = await fill(mid, plan, ident, self.outcomes.stepper(mid))
            if msg.vm in aborting:
                raise Aborted("aborted by request")
        except BaseException as exc:
            self.store.drop(mid)
            # An abort also shows as the devices' reports failing with its reason.
            aborted = isinstance(exc, asyncio.CancelledError | Aborted) or msg.vm in aborting
            self.journal.finish(mid, "aborted" if aborted else "failed", str(exc) or "aborted")
            if not isinstance(exc, XferError) or isinstance(exc, asyncio.CancelledError):
                raise
            what = "was aborted" if aborted else f"failed: {exc}"
            raise MigrationFailed(f"migration {mid} of VM {msg.vm} {what}; nothing stored, the source "
                                  "keeps its state", self.outcomes.report(mid, plan, None)) from None
        finally:
            self.close_round(mid)
        self.journal.state(mid, "stored")
        return {**self.outcomes.report(mid, plan, entry.started), "stored": sizes, "driven_by": entry.driver}

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
        mid, ident = stored.id, VmIdentity.from_dict(stored.vm_identity)
        step = self.outcomes.stepper(mid)
        MIGRATION.set(self.journal.token(mid))
        try:
            outcome = await self.outcomes.guarded(mid, plan, ident, step, move(mid, plan, ident, step),
                                                  entry.msg.vm)
        finally:
            self.close_round(mid)
        self.store.drop(mid)
        return self.outcomes.commit(mid, plan, ident, outcome, entry.started)

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
        plan = self.outcomes.plan_of(stored)
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
        if entry.msg.vm in self.outcomes.aborting:
            rnd.abort(Aborted("aborted by request"))
        return rnd

    def close_round(self, mid: int) -> None:
        rnd = self.rounds.pop(mid, None)
        if rnd is not None:
            rnd.close()

    async def _await_round(self, rnd: Round, step: modes.Step, phase: str) -> dict[Key, Any]:
        """Each awaited report (a journal phase per device) or the error instead: a device's
        own failure, or not reporting within ``device_timeout_s``."""
        timeout = self.outcomes.settings.device_timeout_s

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
