"""The manager's journal: every migration and each of its phases, with times and outcome.

A migration record is written before any device is touched and closed with its
outcome; each phase (one device operation: export, import, push, pull, forget,
rollback) is recorded when it starts and closed when it ends. What a crashed
manager leaves behind is a migration with no outcome: ``unfinished()`` lists
them so the restarted (or newly elected) manager finishes or rolls them back
(``recovery.py``).

The journal is an interface with two backends, chosen by ``[journal] backend``:
``sqlite.py`` (the embedded default, one manager) and ``etcd.py`` (several
managers, one leader). Every method is a coroutine: a backend's I/O never runs
on the event loop that serves the pause window.

    journal = open_journal(settings)                  # backends.py
    mid = await journal.begin("vm1", ident, "hv1", "hv2", "relay", plan_dict, budget_ms=300)
    pid = await journal.phase(mid, "import", "fw-b", ["conntrack"])
    await journal.end_phase(mid, pid, "ok", {"created": 12})
    await journal.finish(mid, "committed")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

# A rollback that did not happen yet (a destination unreachable): the migration stays
# unfinished with this state and is retried in the background until it does.
ROLLBACK_PENDING = "rollback-pending"


@dataclass(frozen=True)
class Phase:
    id: int
    name: str
    device: str
    kinds: tuple[str, ...]
    started: float
    ended: float | None
    outcome: str | None
    detail: dict[str, Any]

    @property
    def ms(self) -> float | None:
        return None if self.ended is None else (self.ended - self.started) * 1000


@dataclass(frozen=True)
class Migration:
    id: int
    vm: str
    vm_identity: dict[str, Any]
    source: str
    destination: str
    mode: str
    plan: dict[str, Any]
    budget_ms: float
    state: str
    started: float
    ended: float | None
    outcome: str | None
    error: str | None
    phases: tuple[Phase, ...] = ()

    @property
    def ms(self) -> float | None:
        return None if self.ended is None else (self.ended - self.started) * 1000

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "vm": self.vm, "source": self.source, "destination": self.destination,
                "mode": self.mode, "state": self.state, "outcome": self.outcome, "error": self.error,
                "started": self.started, "ended": self.ended, "budget_ms": self.budget_ms,
                "ms": None if self.ms is None else round(self.ms, 3),
                "over_budget": self.ms is not None and self.ms > self.budget_ms,
                "plan": self.plan,
                **self._pause(),
                "phases": [{"name": p.name, "device": p.device, "kinds": list(p.kinds),
                            "outcome": p.outcome, "ms": None if p.ms is None else round(p.ms, 3),
                            "started": p.started, "ended": p.ended, "detail": p.detail}
                           for p in self.phases]}

    def _pause(self) -> dict[str, Any]:
        """``pause_ms`` (not-running received -> answer sent) and ``precopy`` of a move."""
        for p in self.phases:
            if p.name == "pause":
                return {"pause_ms": p.detail.get("pause_ms"), "precopy": p.detail.get("precopy")}
        precopy = next((p.detail.get("precopy") for p in self.phases if p.name == "precopy"), None)
        return {"pause_ms": None, "precopy": precopy}


class Journal(Protocol):
    """What the manager needs of a journal backend; each write is durable when it returns."""

    id: str   # the journal's name, shared by every manager that uses it

    def token(self, migration: int) -> str:
        """The name agents know a migration by: unique to this journal, the same after a restart
        or a takeover (a recovering manager's rollback must reach the work of the migration it names)."""
        ...

    async def begin(self, vm: str, vm_identity: dict[str, Any], source: str, destination: str, mode: str,
                    plan: dict[str, Any], budget_ms: float, dedupe: str | None = None) -> int:
        """Journal a new migration (state ``started``); ``dedupe``: the message's de-duplication key."""
        ...

    async def state(self, migration: int, state: str, error: str | None = None) -> None: ...

    async def resolve(self, migration: int, destination: str, plan: dict[str, Any]) -> None:
        """Record the destination an "in" named for a migration whose "out" did not know it."""
        ...

    async def finish(self, migration: int, outcome: str, error: str | None = None) -> None: ...

    async def phase(self, migration: int, name: str, device: str, kinds: list[str] | tuple[str, ...]) -> int:
        ...

    async def end_phase(self, migration: int, phase: int, outcome: str,
                        detail: dict[str, Any] | None = None) -> None: ...

    async def get(self, migration: int) -> Migration:
        """One migration with its phases; KeyError when there is none."""
        ...

    async def recent(self, limit: int = 100) -> list[Migration]:
        """The newest ``limit`` migrations, newest first."""
        ...

    async def latest(self, vm: str, states: tuple[str, ...],
                     outcomes: tuple[str, ...] = ()) -> Migration | None:
        """The newest migration of ``vm`` in one of ``states``, unfinished or ended with ``outcomes``."""
        ...

    async def unfinished(self) -> list[Migration]:
        """Migrations with no outcome, oldest first: a manager died while they were under way."""
        ...

    async def seen(self, dedupe: str, within_s: float) -> int | None:
        """The migration a message with this de-duplication key started within ``within_s``, if any
        (copies reaching another manager after a takeover must not act twice)."""
        ...

    async def prune(self, older_than_s: float) -> int:
        """Retention: forget migrations that ended more than ``older_than_s`` ago; returns how many."""
        ...

    async def close(self) -> None: ...
