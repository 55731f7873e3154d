"""The device-driven variant: what the manager waits for from the devices themselves.

When a migration message reaches the multicast group that agents and manager
join, the agents act on their own behalf instead of being driven by the manager.
Each half of such a migration is a ``Round``: the set of device reports the
manager waits for, one per key —

- "out": ``(source device, "")`` — the source agent exported and deposited its
  bundle in the manager's store;
- "in":  ``(source device, destination device)`` — the destination agent collected
  that source's bundle from the store, imported it and reports its import.

An agent learns its part from ``role`` (it has no topology). A report for a key
that is not awaited (unknown, already reported, or the round is over) is
refused, so the agent knows its work no longer counts (a destination then
forgets what it imported).

    rnd = Round(7, "out", vm, {("fw-a", ""): (Kind.CONNTRACK,)})
    rnd.role_of("fw-a")   # {"role": "source", "migration": 7, "kinds": ["conntrack"], ...}
    rnd.report(("fw-a", ""), {"bytes": 1234})
"""

from __future__ import annotations

import asyncio
from typing import Any

from xfer.agent.protocol import vm_spec
from xfer.errors import XferError
from xfer.model import Kind, VmIdentity

Key = tuple[str, str]   # (source device, destination device or "")


class Round:
    """The reports one device-driven half of a migration waits for (see the module docstring)."""

    def __init__(self, migration: int, direction: str, vm: VmIdentity, expected: dict[Key, tuple[Kind, ...]],
                 token: str = ""):
        # token: the migration's name in agent requests (protocol.MIGRATION): the agent's own
        # import carries it, so the manager's rollback refuses it if it comes late.
        self.migration, self.direction, self.vm, self.token = migration, direction, vm, token
        self.kinds = dict(expected)
        loop = asyncio.get_running_loop()
        self.waiting: dict[Key, asyncio.Future[dict[str, Any]]] = {k: loop.create_future() for k in expected}

    def role_of(self, device: str) -> dict[str, Any]:
        """What ``device`` has to do in this round (the agent's ``role`` answer)."""
        head = {"migration": self.migration, "token": self.token, "vm": vm_spec(self.vm),
                "direction": self.direction}
        if self.direction == "out":
            key = (device, "")
            if key not in self.kinds:
                return {**head, "role": "none"}
            return {**head, "role": "source", "kinds": [k.value for k in self.kinds[key]],
                    "done": self.waiting[key].done()}
        mine = [k for k in self.kinds if k[1] == device]
        if not mine:
            return {**head, "role": "none"}
        return {**head, "role": "destination",
                "collect": [{"source": src, "kinds": [k.value for k in self.kinds[(src, dst)]]}
                            for src, dst in mine],
                "done": all(self.waiting[k].done() for k in mine)}

    def awaits(self, key: Key) -> bool:
        return key in self.waiting and not self.waiting[key].done()

    def report(self, key: Key, result: dict[str, Any] | None = None, error: XferError | None = None) -> bool:
        """Record a device's report; False when the key is not (or no longer) awaited."""
        if not self.awaits(key):
            return False
        if error is not None:
            self.waiting[key].set_exception(error)
        else:
            self.waiting[key].set_result(result or {})
        return True

    def abort(self, why: XferError) -> None:
        """Stop waiting: every report not yet in fails with ``why``."""
        for key in list(self.waiting):
            self.report(key, error=why)

    def close(self) -> None:
        """The round is over: nothing more is awaited (a late report is refused)."""
        for fut in self.waiting.values():
            if not fut.done():
                fut.cancel()
