"""The device-driven variant, the agent's side: act on migration messages heard on the group.

An agent with a ``[manager]`` section joins the multicast group migration
messages are sent to. For each store-mode message it hears (no mode, or "store";
aborts and other modes are the manager's business) it asks the manager for its
part — it has no topology — and does it with the operations it already has:

- source ("out"): export the VM's kinds here, deposit the bundle in the manager's store;
- destination ("in"): collect each source's bundle from the store, import it here
  (checked like any import: this VM, kinds held here), report the import.

If the manager refuses a destination's report (409: the migration was rolled
back, aborted or gave up waiting meanwhile), the agent forgets what it just
imported: the manager's rollback may have come before the import it undoes.
Copies of a message are harmless: the manager answers a part already done with
``done``, and the agent does not start a part it is already doing.

    dd = DeviceDriven(service, Upstream(client, url, "fw-src"), emit)
    await dd.act({"vm": "vm1", "indication": "not-running", "direction": "out", ...})
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from xfer.agent.protocol import MIGRATION, parse_request_vm
from xfer.agent.service import AgentService, Trace
from xfer.agent.upstream import Upstream
from xfer.errors import AgentError, XferError
from xfer.model import Kind, VmIdentity, parse_kinds

# How long a part done is remembered (a late copy of its message then does nothing).
ACT_MEMORY_S = 600.0
Emit = Callable[[dict[str, Any]], None]
Observe = Callable[[str, str, float, Trace], None]


def wanted(body: Any) -> bool:
    """Whether a heard message may give this agent work (store semantics, not an abort)."""
    return (isinstance(body, dict) and body.get("indication") in ("not-running", "starting")
            and body.get("mode") in (None, "store"))


class DeviceDriven:
    """One agent's device-driven work; ``heard`` takes datagrams, ``act`` one message."""

    def __init__(self, service: AgentService, upstream: Upstream, emit: Emit,
                 observe: Observe | None = None) -> None:
        self.service, self.upstream, self.emit = service, upstream, emit
        self.observe = observe or (lambda op, outcome, seconds, trace: None)
        self._acting: dict[tuple[int, str], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def heard(self, data: bytes) -> None:
        """A datagram from the group: act on it in the background if it is ours to act on."""
        try:
            body = json.loads(data)
        except ValueError:
            self.emit({"event": "heard", "error": "datagram is not JSON"})
            return
        if not wanted(body):
            return
        task = asyncio.ensure_future(self.act(body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def act(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ask the manager for this device's part in the message and do it; returns what was done."""
        started = time.perf_counter()
        head = {"event": "device-driven", "device": self.upstream.device, "vm": body.get("vm"),
                "direction": body.get("direction")}
        try:
            part = await self.upstream.role(body)
        except XferError as exc:
            self.emit({**head, "error": f"no part from the manager: {exc}"})
            return {"acted": False, "error": str(exc)}
        role, mid = part.get("role"), part.get("migration")
        now = time.monotonic()
        for key in [k for k, t in self._acting.items() if now - t > ACT_MEMORY_S]:
            del self._acting[key]
        if (role not in ("source", "destination") or not isinstance(mid, int) or part.get("done")
                or (mid, role) in self._acting):
            return {"acted": False, "role": role, "migration": mid}
        self._acting[(mid, role)] = now
        # This task's work belongs to that migration: a rollback the manager sends before the
        # import gets here makes the service refuse it.
        MIGRATION.set(str(part.get("token") or ""))
        trace = Trace()
        outcome, error, result = "ok", "", dict[str, Any]()
        try:
            vm = parse_request_vm(part.get("vm"))
            if role == "source":
                result = await self._deposit(mid, vm, parse_kinds(part.get("kinds") or []), trace)
            else:
                result = await self._collect(mid, vm, list(part.get("collect") or []), trace)
                if any("report" not in r for r in result.values()):
                    outcome = "failed"
        except XferError as exc:
            outcome, error = "failed", str(exc)
        seconds = time.perf_counter() - started
        op = "deposit" if role == "source" else "collect"
        self.observe(op, outcome, seconds, trace)
        self.emit({**head, "op": op, "migration": mid, "outcome": outcome, "ms": round(seconds * 1000, 3),
                   "phases_ms": {k: round(v * 1000, 3) for k, v in trace.phases.items()},
                   "entries": trace.entries, **({"error": error} if error else {})})
        return {"acted": True, "role": role, "migration": mid, "outcome": outcome, "result": result,
                **({"error": error} if error else {})}

    async def _deposit(self, mid: int, vm: VmIdentity, kinds: tuple[Kind, ...],
                       trace: Trace) -> dict[str, Any]:
        try:
            _, data = await self.service.export(vm, kinds, trace)
        except XferError as exc:
            await self._tell(mid, {"error": f"export failed: {exc}"})
            raise
        with trace.phase("deposit"):
            await self.upstream.deposit(mid, data)
        return {"bytes": len(data)}

    async def _collect(self, mid: int, vm: VmIdentity, items: list[dict[str, Any]],
                       trace: Trace) -> dict[str, dict[str, Any]]:
        """Import each source's bundle; per source: {"report"} or {"error"} or {"undone"}."""
        done: dict[str, dict[str, Any]] = {}
        for item in items:
            source, kinds = str(item.get("source")), parse_kinds(item.get("kinds") or [])
            try:
                with trace.phase("collect"):
                    data = await self.upstream.collect(mid, source)
                report = (await self.service.import_(data, vm, kinds, trace)).to_dict()
            except XferError as exc:
                await self._tell(mid, {"source": source, "error": str(exc)})
                done[source] = {"error": str(exc)}
                continue
            try:
                await self.upstream.report(mid, {"source": source, "report": report})
            except AgentError as exc:
                if exc.status != 409:
                    # Unknown whether the manager counted it: it decides, and rolls back by request.
                    raise
                # The manager no longer counts this import: undo it here (its rollback may have
                # reached this device before the import did).
                await self.service.forget(vm, kinds, trace)
                done[source] = {"undone": str(exc)}
                continue
            done[source] = {"report": report}
        return done

    async def _tell(self, mid: int, body: dict[str, Any]) -> None:
        """Report a failure to the manager (best effort: it gives up waiting anyway)."""
        try:
            await self.upstream.report(mid, body)
        except XferError as exc:
            self.emit({"event": "device-driven", "device": self.upstream.device, "migration": mid,
                       "error": f"could not report a failure to the manager: {exc}"})


class Heard(asyncio.DatagramProtocol):
    """The multicast socket's protocol: every datagram goes to ``on_datagram``."""

    def __init__(self, on_datagram: Callable[[bytes], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data)
