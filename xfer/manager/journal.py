"""The manager's journal (SQLite): every migration and each of its phases, with times and outcome.

A migration row is written before any device is touched and closed with its
outcome; each phase (one device operation: export, import, push, pull, forget,
rollback) gets a row when it starts and is closed when it ends. What a crashed
manager leaves behind is a migration with no outcome: ``unfinished()`` lists
them so the restarted manager finishes or rolls them back (``recovery.py``).

    with Journal(Path("/var/lib/xfer/manager.db")) as j:
        mid = j.begin("vm1", "hv1", "hv2", "relay", plan_dict, budget_ms=300)
        pid = j.phase(mid, "import", "fw-b", ["conntrack"])
        j.end_phase(pid, "ok", {"created": 12})
        j.finish(mid, "committed")
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL, vm_identity TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL,
    mode TEXT NOT NULL, plan TEXT NOT NULL, budget_ms REAL NOT NULL,
    state TEXT NOT NULL,            -- started | stored | committed, then the outcome
    started REAL NOT NULL, ended REAL, outcome TEXT, error TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS phases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    migration INTEGER NOT NULL REFERENCES migrations(id),
    name TEXT NOT NULL, device TEXT NOT NULL, kinds TEXT NOT NULL,
    started REAL NOT NULL, ended REAL, outcome TEXT, detail TEXT
);
"""


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


class Journal:
    """One SQLite file; every write is its own committed transaction (durable before the next step)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, each statement durable on return.
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL with WAL is durable against a process crash (the case the journal is for).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (secrets.token_hex(6),))
        self.id = str(self._db.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()[0])

    def token(self, migration: int) -> str:
        """The name agents know a migration by: unique to this journal, the same after a restart
        (a recovering manager's rollback must reach work of the migration it names)."""
        return f"{self.id}-{migration}"

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def begin(self, vm: str, vm_identity: dict[str, Any], source: str, destination: str, mode: str,
              plan: dict[str, Any], budget_ms: float) -> int:
        cur = self._db.execute(
            "INSERT INTO migrations (vm, vm_identity, source, destination, mode, plan, budget_ms, state,"
            " started) VALUES (?, ?, ?, ?, ?, ?, ?, 'started', ?)",
            (vm, json.dumps(vm_identity), source, destination, mode, json.dumps(plan), budget_ms,
             time.time()))
        return int(cur.lastrowid or 0)

    def state(self, migration: int, state: str) -> None:
        self._db.execute("UPDATE migrations SET state = ? WHERE id = ?", (state, migration))

    def resolve(self, migration: int, destination: str, plan: dict[str, Any]) -> None:
        """Record the destination an "in" named for a migration whose "out" did not know it."""
        self._db.execute("UPDATE migrations SET destination = ?, plan = ? WHERE id = ?",
                         (destination, json.dumps(plan), migration))

    def finish(self, migration: int, outcome: str, error: str | None = None) -> None:
        self._db.execute("UPDATE migrations SET state = ?, outcome = ?, error = ?, ended = ? WHERE id = ?",
                         (outcome, outcome, error, time.time(), migration))

    def phase(self, migration: int, name: str, device: str, kinds: list[str] | tuple[str, ...]) -> int:
        cur = self._db.execute(
            "INSERT INTO phases (migration, name, device, kinds, started) VALUES (?, ?, ?, ?, ?)",
            (migration, name, device, ",".join(kinds), time.time()))
        return int(cur.lastrowid or 0)

    def end_phase(self, phase: int, outcome: str, detail: dict[str, Any] | None = None) -> None:
        self._db.execute("UPDATE phases SET ended = ?, outcome = ?, detail = ? WHERE id = ?",
                         (time.time(), outcome, json.dumps(detail or {}, default=str), phase))

    def get(self, migration: int) -> Migration:
        row = self._db.execute("SELECT * FROM migrations WHERE id = ?", (migration,)).fetchone()
        if row is None:
            raise KeyError(migration)
        return self._migration(row)

    def recent(self, limit: int = 100) -> list[Migration]:
        rows = self._db.execute("SELECT * FROM migrations ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [self._migration(r) for r in rows]

    def latest(self, vm: str, states: tuple[str, ...], outcomes: tuple[str, ...] = ()) -> Migration | None:
        """The newest migration of ``vm`` in one of ``states``, unfinished or ended with ``outcomes``."""
        marks, omarks = ",".join("?" * len(states)), ",".join("?" * len(outcomes)) or "NULL"
        row = self._db.execute(f"SELECT * FROM migrations WHERE vm = ? AND state IN ({marks}) AND "
                               f"(outcome IS NULL OR outcome IN ({omarks})) ORDER BY id DESC LIMIT 1",
                               (vm, *states, *outcomes)).fetchone()
        return None if row is None else self._migration(row)

    def unfinished(self) -> list[Migration]:
        """Migrations with no outcome: a manager died while they were under way."""
        rows = self._db.execute("SELECT * FROM migrations WHERE outcome IS NULL ORDER BY id").fetchall()
        return [self._migration(r) for r in rows]

    def _migration(self, row: tuple[Any, ...]) -> Migration:
        (mid, vm, ident, source, dest, mode, plan, budget, state, started, ended, outcome, error) = row
        phases = tuple(
            Phase(p[0], p[2], p[3], tuple(k for k in p[4].split(",") if k), p[5], p[6], p[7],
                  json.loads(p[8]) if p[8] else {})
            for p in self._db.execute("SELECT * FROM phases WHERE migration = ? ORDER BY id", (mid,)))
        return Migration(mid, vm, json.loads(ident), source, dest, mode, json.loads(plan), budget, state,
                         started, ended, outcome, error, phases)
