"""Pre-copy through the manager: stage a running VM's conntrack state at its destinations,
stream the changes, and let only the last delta move in the pause.

``"migrating"`` (direction "out", the VM still runs) opens a session: for every
(source device, destination device) pair that moves conntrack, a whole copy is
staged at the destination, then the changes since follow every ``interval_s``
until ``"not-running"``, when ``final`` sends the last delta and the destinations
commit. ``abort`` (an abort message, a failed migration, or no "not-running"
within ``expire_s``) removes what was staged; the source is never touched. The
session is named by the journal token of its "migrating" migration: agents key
their stages by it (the ``Xfer-Migration`` header).

Modes: relay (the manager fetches the changes from the source agent and stages
them at the destination), pull (the destination agent fetches them itself), push
(the source agent sends them). Store mode does not pre-copy: its destination
devices are known only when "in" arrives, after the pause.

    pre = Precopy(client)
    session = await pre.open("vm1", ident, plan, "relay", token)   # the bulk is staged
    report = await pre.final(session)                              # in the pause
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from xfer.agent.protocol import MIGRATION
from xfer.errors import UsageError, XferError
from xfer.manager.plan import Plan
from xfer.manager.topology import Device
from xfer.model import Kind, VmIdentity

log = logging.getLogger("xfer.manager")
DEFAULT_INTERVAL_S = 0.5
DEFAULT_EXPIRE_S = 600.0
PRECOPY_MODES = ("relay", "pull", "push")


class PrecopyDevices(Protocol):
    """The agent operations pre-copy uses (``xfer.agent.client.AgentClient``)."""

    async def precopy_changes(self, url: str, vm: VmIdentity, cursor: str) -> bytes: ...

    async def precopy_stage(self, url: str, data: bytes, vm: VmIdentity, *,
                            final: bool = False) -> dict[str, Any]: ...

    async def precopy_pull(self, url: str, vm: VmIdentity, source: str, *,
                           final: bool = False) -> dict[str, Any]: ...

    async def precopy_push(self, url: str, vm: VmIdentity, destination: str, cursor: str, *,
                           final: bool = False) -> dict[str, Any]: ...

    async def precopy_abort(self, url: str, vm: VmIdentity) -> dict[str, Any]: ...


Pair = tuple[Device, Device]


@dataclass(eq=False)
class Session:
    """One VM's pre-copy: its pairs, where each destination stands, what went."""

    vm: str
    ident: VmIdentity
    plan: Plan
    mode: str
    token: str
    migration: int
    pairs: list[Pair]
    cursors: dict[Pair, str] = field(default_factory=dict)
    staged: dict[Pair, int] = field(default_factory=dict)
    deltas: int = 0
    rounds: int = 0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    expires: float = 0.0
    task: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def summary(self) -> dict[str, int]:
        return {"staged": sum(self.staged.values()), "deltas": self.deltas}


def conntrack_pairs(plan: Plan) -> list[Pair]:
    """(source, destination) of every conntrack route of the plan."""
    return [(r.source, d) for r in plan.routes if r.kind == Kind.CONNTRACK for d in r.destinations]


class Precopy:
    """Pre-copy sessions, one per VM (see the module docstring)."""

    def __init__(self, devices: PrecopyDevices, *, interval_s: float = DEFAULT_INTERVAL_S,
                 expire_s: float = DEFAULT_EXPIRE_S,
                 on_expired: Callable[[Session], Awaitable[None]] | None = None) -> None:
        self.devices = devices
        self.interval_s = interval_s
        self.expire_s = expire_s
        self.sessions: dict[str, Session] = {}
        self._on_expired = on_expired

    def get(self, vm: str) -> Session | None:
        return self.sessions.get(vm)

    async def open(self, vm: str, ident: VmIdentity, plan: Plan, mode: str, token: str,
                   migration: int) -> Session:
        """Stage the whole copy at every destination (returns once staged), then keep
        streaming changes in the background."""
        if mode not in PRECOPY_MODES:
            raise UsageError(f"pre-copy works in {', '.join(PRECOPY_MODES)} modes, not {mode!r} "
                             "(store mode: the destination is known only after the pause)")
        if vm in self.sessions:
            raise UsageError(f"VM {vm} is already being pre-copied")
        pairs = conntrack_pairs(plan)
        if not pairs:
            raise UsageError(f"nothing to pre-copy for VM {vm}: no conntrack route between "
                             f"{plan.source} and {plan.destination}")
        session = Session(vm, ident, plan, mode, token, migration, pairs,
                          expires=time.monotonic() + self.expire_s)
        self.sessions[vm] = session
        try:
            await self._round(session, final=False)
        except BaseException:
            await self.abort(vm)
            raise
        session.task = asyncio.ensure_future(self._stream(session))
        return session

    async def _stream(self, session: Session) -> None:
        """Rounds of changes until final/abort; a session past ``expires`` is aborted."""
        while True:
            await asyncio.sleep(self.interval_s)
            if time.monotonic() > session.expires:
                log.warning("pre-copy of VM %s expired: no \"not-running\" within %.0f s",
                            session.vm, self.expire_s)
                await self.abort(session.vm)
                if self._on_expired is not None:
                    await self._on_expired(session)
                return
            try:
                await self._round(session, final=False)
            except XferError as exc:
                # a failed round is retried next time; the final round says if it is fatal
                session.error = str(exc)
                log.warning("pre-copy round for VM %s failed: %s", session.vm, exc)

    async def _round(self, session: Session, *, final: bool) -> dict[Pair, dict[str, Any]]:
        """One round: the changes since each destination's cursor, staged there."""
        async with session.lock:
            token = MIGRATION.set(session.token)
            try:
                results = await asyncio.gather(*(self._pair(session, p, final) for p in session.pairs),
                                               return_exceptions=True)
            finally:
                MIGRATION.reset(token)
            out: dict[Pair, dict[str, Any]] = {}
            errors = []
            for pair, result in zip(session.pairs, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, XferError | OSError):
                        raise result
                    errors.append(f"{pair[1].id}: {result}")
                    continue
                session.cursors[pair] = str(result.get("cursor", ""))
                session.staged[pair] = int(result.get("staged", 0))
                out[pair] = result
            session.rounds += 1
            if session.rounds > 1:
                session.deltas += 1
            if errors:
                raise _RoundFailed("pre-copy: " + "; ".join(errors), out)
            session.error = None
            return out

    async def _pair(self, session: Session, pair: Pair, final: bool) -> dict[str, Any]:
        src, dst = pair
        cursor = session.cursors.get(pair, "")
        vm = session.ident
        if session.mode == "pull":
            return await self.devices.precopy_pull(dst.agent, vm, src.agent, final=final)
        if session.mode == "push":
            return await self.devices.precopy_push(src.agent, vm, dst.agent, cursor, final=final)
        data = await self.devices.precopy_changes(src.agent, vm, cursor)
        return await self.devices.precopy_stage(dst.agent, data, vm, final=final)

    async def final(self, session: Session) -> dict[Pair, str | None]:
        """The pause: stop streaming, send the last delta, let the destinations commit.
        Returns each pair's error (None: committed)."""
        await self._stop(session)
        self.sessions.pop(session.vm, None)
        try:
            results = await self._round(session, final=True)
        except _RoundFailed as exc:
            results = exc.done
        return {p: None if p in results else (session.error or "pre-copy failed") for p in session.pairs}

    async def abort(self, vm: str) -> dict[str, Any]:
        """Remove what the VM's session staged at its destinations."""
        session = self.sessions.pop(vm, None)
        if session is None:
            raise UsageError(f"no pre-copy of VM {vm} under way")
        await self._stop(session)
        token = MIGRATION.set(session.token)
        try:
            dests = {d.agent: d for _, d in session.pairs}
            results = await asyncio.gather(*(self.devices.precopy_abort(url, session.ident)
                                             for url in dests), return_exceptions=True)
        finally:
            MIGRATION.reset(token)
        errors = [f"{d.id}: {r}" for d, r in zip(dests.values(), results, strict=True)
                  if isinstance(r, BaseException)]
        return {"removed": sum(r.get("removed", 0) for r in results if isinstance(r, dict)),
                "errors": errors}

    async def _stop(self, session: Session) -> None:
        """Stop the streaming task between rounds (never inside one: a request cut off
        halfway would leave the destination ahead of the cursor we hold)."""
        task = session.task
        session.task = None
        if task is None or task is asyncio.current_task():
            return
        async with session.lock:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close(self) -> None:
        for vm in list(self.sessions):
            with contextlib.suppress(XferError):
                await self.abort(vm)


async def move_with(pre: Precopy, session: Session, devices: Any, plan: Plan, ident: VmIdentity,
                    step: Any, move: Callable[..., Awaitable[Any]]) -> Any:
    """The pause with pre-copy: the last conntrack delta and the commit (``final``) beside
    the usual move of the other kinds; one Outcome for both."""
    from xfer.manager import modes

    rest = dataclasses.replace(plan, routes=[r for r in plan.routes if r.kind != Kind.CONNTRACK])

    async def others() -> modes.Outcome:
        if not rest.routes:
            return modes.Outcome()
        outcome: modes.Outcome = await move(devices, rest, ident, step)
        return outcome

    finals, outcome = await asyncio.gather(pre.final(session), others())
    for (src, dst), error in finals.items():
        if error is None:
            outcome.committed.append((src, dst, (Kind.CONNTRACK,)))
        else:
            outcome.failed.append((src, dst, (Kind.CONNTRACK,), error))
    outcome.precopy = session.summary()
    return outcome


class _RoundFailed(XferError):
    def __init__(self, message: str, done: dict[Pair, dict[str, Any]]) -> None:
        self.done = done
        super().__init__(message)
