"""The four ways a migration moves bundles, each a list of device operations on a plan.

Every device operation goes through the agent client (``Devices``); each is one
journal phase. Operations on different devices run concurrently. A mode's job
ends when every destination device has answered its import: ``Outcome`` says
which (source, destination, kinds) committed and which failed. Deciding what
that means (commit, rollback, cleanup) is ``migration.py``'s.

- relay: export once per source device (manager holds the bytes), import into
  each destination device the kinds routed to it;
- push:  each source device sends straight to each destination device (agent /push);
- pull:  each destination device fetches straight from its source device (agent /pull);
- store: the manager exports into its store on "out" and imports from it on "in"
  (``export_all``, ``import_all``), or — the device-driven variant — the devices
  deposit and collect themselves (``rounds.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from xfer.errors import XferError
from xfer.manager.plan import Plan
from xfer.manager.topology import Device
from xfer.model import Kind, VmIdentity

MODES = ("relay", "pull", "push", "store")


class Devices(Protocol):
    """The agent operations the manager uses (``xfer.agent.client.AgentClient`` satisfies it)."""

    async def export(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> bytes: ...

    async def import_(self, url: str, data: bytes, vm: VmIdentity,
                      kinds: Sequence[Kind] | None = None) -> dict[str, Any]: ...

    async def forget(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> dict[str, Any]: ...

    async def push(self, url: str, vm: VmIdentity, kinds: Sequence[Kind],
                   destination: str) -> dict[str, Any]: ...

    async def pull(self, url: str, vm: VmIdentity, kinds: Sequence[Kind], source: str) -> dict[str, Any]: ...


# (phase name, device, kinds, operation) -> result; the caller journals and times it.
Step = Callable[[str, Device, Sequence[Kind], Callable[[], Awaitable[Any]]], Awaitable[Any]]


@dataclass
class Outcome:
    """Which destination imports committed and which failed (with the reason)."""

    committed: list[tuple[Device, Device, tuple[Kind, ...]]] = field(default_factory=list)
    failed: list[tuple[Device, Device, tuple[Kind, ...], str]] = field(default_factory=list)
    precopy: dict[str, int] | None = None  # {"staged", "deltas"} when conntrack was pre-copied

    @property
    def ok(self) -> bool:
        return not self.failed

    def touched(self) -> dict[Device, set[Kind]]:
        """Destination devices and the kinds an import was attempted for (what a rollback forgets)."""
        out: dict[Device, set[Kind]] = {}
        for _, dst, kinds in [*self.committed, *((s, d, k) for s, d, k, _ in self.failed)]:
            out.setdefault(dst, set()).update(kinds)
        return out


def report_ok(report: dict[str, Any]) -> bool:
    """An agent's import report says every entry of every kind went in."""
    kinds = report.get("kinds", {})
    return report.get("failed", 0) == 0 and not any("error" in k for k in kinds.values())


def report_error(report: dict[str, Any]) -> str:
    errors = [f"{k}: {v['error']}" for k, v in report.get("kinds", {}).items() if "error" in v]
    return "; ".join(errors) or f"{report.get('failed', 0)} entries failed"


Pair = tuple[Device, Device, tuple[Kind, ...]]


async def _gather(items: list[Pair], call: Callable[[Device, Device, tuple[Kind, ...]],
                                                    Awaitable[dict[str, Any]]]) -> Outcome:
    results = await asyncio.gather(*(call(s, d, k) for s, d, k in items), return_exceptions=True)
    return outcome_of(items, results)


def outcome_of(items: list[Pair], results: Sequence[dict[str, Any] | BaseException]) -> Outcome:
    """Which (source, destination) imports committed, from each one's import report or error."""
    outcome = Outcome()
    for (src, dst, kinds), result in zip(items, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, XferError | OSError):
                raise result
            outcome.failed.append((src, dst, kinds, str(result)))
        elif report_ok(result):
            outcome.committed.append((src, dst, kinds))
        else:
            outcome.failed.append((src, dst, kinds, report_error(result)))
    return outcome


def pairs(plan: Plan) -> list[Pair]:
    """(source, destination, kinds) of every import the plan needs."""
    return [(s, d, tuple(k)) for (s, d), k in plan.pairs().items()]


async def export_all(devices: Devices, plan: Plan, vm: VmIdentity, step: Step) -> dict[str, bytes]:
    """One export per source device, concurrently: source id -> bundle bytes. Raises on failure."""
    sources = list(plan.by_source().items())

    async def one(dev: Device, kinds: list[Kind]) -> bytes:
        data: bytes = await step("export", dev, kinds, lambda: devices.export(dev.agent, vm, kinds))
        return data

    blobs = await asyncio.gather(*(one(d, k) for d, k in sources))
    return {d.id: b for (d, _), b in zip(sources, blobs, strict=True)}


async def import_all(devices: Devices, plan: Plan, vm: VmIdentity, bundles: dict[str, bytes],
                     step: Step) -> Outcome:
    """Import into every destination the kinds each source routes to it."""

    async def one(src: Device, dst: Device, kinds: tuple[Kind, ...]) -> dict[str, Any]:
        result: dict[str, Any] = await step(
            "import", dst, kinds, lambda: devices.import_(dst.agent, bundles[src.id], vm, kinds))
        return result

    return await _gather(pairs(plan), one)


async def relay(devices: Devices, plan: Plan, vm: VmIdentity, step: Step) -> Outcome:
    return await import_all(devices, plan, vm, await export_all(devices, plan, vm, step), step)


async def push(devices: Devices, plan: Plan, vm: VmIdentity, step: Step) -> Outcome:
    async def one(src: Device, dst: Device, kinds: tuple[Kind, ...]) -> dict[str, Any]:
        result = await step("push", src, kinds, lambda: devices.push(src.agent, vm, kinds, dst.agent))
        # The push's answer carries the destination's import report.
        report: dict[str, Any] = result.get("report", {})
        return report

    return await _gather(pairs(plan), one)


async def pull(devices: Devices, plan: Plan, vm: VmIdentity, step: Step) -> Outcome:
    async def one(src: Device, dst: Device, kinds: tuple[Kind, ...]) -> dict[str, Any]:
        result: dict[str, Any] = await step("pull", dst, kinds,
                                            lambda: devices.pull(dst.agent, vm, kinds, src.agent))
        return result

    return await _gather(pairs(plan), one)


async def forget(devices: Devices, targets: dict[Device, set[Kind]], vm: VmIdentity, step: Step,
                 name: str) -> list[str]:
    """Forget the VM's kinds on each device concurrently; returns the errors (none: all done)."""
    items = [(dev, tuple(k for k in Kind if k in kinds)) for dev, kinds in targets.items() if kinds]

    async def one(dev: Device, kinds: tuple[Kind, ...]) -> None:
        await step(name, dev, kinds, lambda: devices.forget(dev.agent, vm, kinds))

    results = await asyncio.gather(*(one(d, k) for d, k in items), return_exceptions=True)
    errors = []
    for (dev, _), result in zip(items, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, XferError | OSError):
                raise result
            errors.append(f"{dev.id}: {result}")
    return errors
