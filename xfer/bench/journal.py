"""``xfer bench journal``: one migration's journal bookkeeping and ``recent(100)`` as the journal
grows from 0 to 1M migrations, against the journal as it was before issue 12.5 (same run).

The baseline is that journal's schema and queries (no index but the primary keys,
called on the event loop's thread); filling is the same bulk insert for both.
One migration's bookkeeping is what a relay migration writes and reads: begin,
three phases opened and closed, the commit, the report (a read of the migration
with its phases) and the finish.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from xfer.bench.common import Echo, median, write_results
from xfer.manager.sqlite import SqliteJournal

_BASELINE_SCHEMA = """
CREATE TABLE migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL, vm_identity TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL,
    mode TEXT NOT NULL, plan TEXT NOT NULL, budget_ms REAL NOT NULL, state TEXT NOT NULL,
    started REAL NOT NULL, ended REAL, outcome TEXT, error TEXT);
CREATE TABLE phases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, migration INTEGER NOT NULL REFERENCES migrations(id),
    name TEXT NOT NULL, device TEXT NOT NULL, kinds TEXT NOT NULL,
    started REAL NOT NULL, ended REAL, outcome TEXT, detail TEXT);
"""
PLAN = {"routes": [{"kind": "conntrack", "source": "fw-a", "destinations": ["fw-b"]}]}
IDENT = {"name": "vm1", "macs": ["52:54:00:00:00:01"], "ipv4": ["10.0.0.1"]}
PHASES = ("export", "import", "cleanup")


class _Baseline:
    """The pre-12.5 journal's statements, as it ran them (synchronously)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        if not self.db.execute("SELECT name FROM sqlite_master WHERE name='migrations'").fetchone():
            self.db.executescript(_BASELINE_SCHEMA)

    def migration(self) -> None:
        cur = self.db.execute("INSERT INTO migrations (vm, vm_identity, source, destination, mode, plan,"
                              " budget_ms, state, started) VALUES (?, ?, ?, ?, ?, ?, ?, 'started', ?)",
                              ("vm1", json.dumps(IDENT), "hv1", "hv2", "relay", json.dumps(PLAN), 300,
                               time.time()))
        mid = cur.lastrowid
        for name in PHASES:
            pid = self.db.execute("INSERT INTO phases (migration, name, device, kinds, started) VALUES "
                                  "(?, ?, ?, ?, ?)", (mid, name, "fw-a", "conntrack", time.time())).lastrowid
            self.db.execute("UPDATE phases SET ended = ?, outcome = ?, detail = ? WHERE id = ?",
                            (time.time(), "ok", "{}", pid))
            if name == "import":
                self.db.execute("UPDATE migrations SET state = ? WHERE id = ?", ("committed", mid))
                self._get(mid)
        self.db.execute("UPDATE migrations SET state = ?, outcome = ?, error = ?, ended = ? WHERE id = ?",
                        ("cleaned", "cleaned", None, time.time(), mid))

    def _get(self, mid: int | None) -> None:
        self.db.execute("SELECT * FROM migrations WHERE id = ?", (mid,)).fetchone()
        self.db.execute("SELECT * FROM phases WHERE migration = ? ORDER BY id", (mid,)).fetchall()

    def recent(self, limit: int) -> None:
        for row in self.db.execute("SELECT * FROM migrations ORDER BY id DESC LIMIT ?", (limit,)).fetchall():
            self._get(row[0])


async def _xfer_migration(j: SqliteJournal) -> None:
    mid = await j.begin("vm1", IDENT, "hv1", "hv2", "relay", PLAN, 300, "id:bench")
    for name in PHASES:
        pid = await j.phase(mid, name, "fw-a", ["conntrack"])
        await j.end_phase(mid, pid, "ok", {})
        if name == "import":
            await j.state(mid, "committed")
            await j.get(mid)
    await j.finish(mid, "cleaned")


def _fill(path: Path, count: int) -> None:
    """Add ``count`` finished migrations (three phases each) in one transaction, as history."""
    db = sqlite3.connect(str(path), isolation_level=None)
    first = db.execute("SELECT coalesce(max(id), 0) FROM migrations").fetchone()[0] + 1
    now = time.time()
    db.execute("BEGIN")
    db.executemany("INSERT INTO migrations (id, vm, vm_identity, source, destination, mode, plan, budget_ms,"
                   " state, started, ended, outcome) VALUES (?, ?, ?, 'hv1', 'hv2', 'relay', ?, 300,"
                   " 'cleaned', ?, ?, 'cleaned')",
                   ((i, f"vm{i % 5000}", json.dumps(IDENT), json.dumps(PLAN), now, now)
                    for i in range(first, first + count)))
    db.executemany("INSERT INTO phases (migration, name, device, kinds, started, ended, outcome, detail)"
                   " VALUES (?, ?, 'fw-a', 'conntrack', ?, ?, 'ok', '{}')",
                   ((i, name, now, now) for i in range(first, first + count) for name in PHASES))
    db.execute("COMMIT")
    db.close()


def run(sizes: list[int], repeat: int, out: Path, echo: Echo = None) -> dict[str, Any]:
    """Both journals at each size; per-migration and recent(100) medians in ms, and their ratio."""
    say = echo or (lambda s: None)
    levels = []
    with tempfile.TemporaryDirectory(prefix="xfer-bench-journal-") as tmp:
        base_path, new_path = Path(tmp) / "baseline.db", Path(tmp) / "xfer.db"
        baseline = _Baseline(base_path)
        journal = SqliteJournal(new_path)
        loop = asyncio.new_event_loop()
        have = 0
        for size in sorted(sizes):
            _fill(base_path, size - have)
            _fill(new_path, size - have)
            have = size
            level: dict[str, Any] = {"journaled": size}
            for name, one, recent, n in (
                    ("baseline", baseline.migration, lambda: baseline.recent(100),
                     max(3, repeat // 10) if size >= 100_000 else repeat),
                    ("xfer", lambda: loop.run_until_complete(_xfer_migration(journal)),
                     lambda: loop.run_until_complete(journal.recent(100)), repeat)):
                per, lists = [], []
                for _ in range(n):
                    t = time.perf_counter()
                    one()
                    per.append((time.perf_counter() - t) * 1000)
                for _ in range(max(1, min(5, n // 5))):
                    t = time.perf_counter()
                    recent()
                    lists.append((time.perf_counter() - t) * 1000)
                level[name] = {"migration_ms": round(median(per), 3), "recent100_ms": round(median(lists), 3),
                               "runs": n}
            for key in ("migration", "recent100"):
                level[f"ratio_{key}"] = round(level["baseline"][f"{key}_ms"] / level["xfer"][f"{key}_ms"], 2)
            say(f"{size:>8} journaled: migration {level['xfer']['migration_ms']:.3f} ms "
                f"(baseline {level['baseline']['migration_ms']:.3f}, x{level['ratio_migration']}), "
                f"recent(100) {level['xfer']['recent100_ms']:.1f} ms "
                f"(baseline {level['baseline']['recent100_ms']:.1f}, x{level['ratio_recent100']})")
            levels.append(level)
        loop.run_until_complete(journal.close())
        loop.close()
        baseline.db.close()
    flat = levels[-1]["xfer"]["migration_ms"] / max(levels[0]["xfer"]["migration_ms"], 1e-9)
    result = {"levels": levels, "repeat": repeat, "xfer_growth_first_to_last": round(flat, 2),
              "baseline_tool": "the manager's journal before issue 12.5 (no indexes, on the loop)",
              "target": "per-migration cost flat from 0 to 1M journaled migrations"}
    result["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    write_results(out, result)
    return result
