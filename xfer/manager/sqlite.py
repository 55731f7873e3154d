"""The embedded journal and store backend: one SQLite file, for a manager on its own.

Every query runs on the backend's own thread (one connection per thread, in
order), never on the event loop: a journal write costs ~0.1 ms, but a slow disk
or a large table must not stall the other VMs' pause windows. Each query is
indexed so its cost does not grow with the journal (``xfer bench journal``).

    journal = SqliteJournal(Path("/var/lib/xfer/manager.db"))
    mid = await journal.begin("vm1", ident, "hv1", "hv2", "relay", plan, 300)
    store = SqliteStore(Path("/var/lib/xfer/manager.db"), ttl_s=60)
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from xfer.manager.journal import Migration, Phase

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vm TEXT NOT NULL, vm_identity TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL,
    mode TEXT NOT NULL, plan TEXT NOT NULL, budget_ms REAL NOT NULL,
    state TEXT NOT NULL,            -- started | stored | committed | rollback-pending, then the outcome
    started REAL NOT NULL, ended REAL, outcome TEXT, error TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS phases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    migration INTEGER NOT NULL REFERENCES migrations(id),
    name TEXT NOT NULL, device TEXT NOT NULL, kinds TEXT NOT NULL,
    started REAL NOT NULL, ended REAL, outcome TEXT, detail TEXT
);
CREATE TABLE IF NOT EXISTS store (
    migration INTEGER NOT NULL, device TEXT NOT NULL, data BLOB NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (migration, device)
);
"""
# Added after the first release: a journal written by an older manager gains them on open.
_COLUMNS = {"dedupe": "ALTER TABLE migrations ADD COLUMN dedupe TEXT"}
_INDEXES = """
CREATE INDEX IF NOT EXISTS phases_by_migration ON phases (migration);
CREATE INDEX IF NOT EXISTS migrations_by_vm ON migrations (vm, id);
CREATE INDEX IF NOT EXISTS migrations_open ON migrations (id) WHERE outcome IS NULL;
CREATE INDEX IF NOT EXISTS migrations_by_end ON migrations (ended) WHERE ended IS NOT NULL;
CREATE INDEX IF NOT EXISTS migrations_by_dedupe ON migrations (dedupe) WHERE dedupe IS NOT NULL;
CREATE INDEX IF NOT EXISTS store_by_expiry ON store (expires);
"""
_PRUNE_BATCH = 2000


class _Db:
    """One SQLite connection used from one thread of its own; ``run`` awaits a function of it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="xfer-sqlite")
        self.conn = self._pool.submit(self._open, path).result()

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        # isolation_level=None: autocommit, each statement durable on return.
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL with WAL is durable against a process crash (the case the journal is for);
        # a bundle lost with the machine costs nothing: the source keeps its state until
        # the destination has committed.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        have = {r[1] for r in conn.execute("PRAGMA table_info(migrations)")}
        for column, ddl in _COLUMNS.items():
            if column not in have:
                conn.execute(ddl)
        conn.executescript(_INDEXES)
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self.conn)

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """The same, from synchronous code (the CLI, benchmarks)."""
        return self._pool.submit(fn, self.conn).result()

    def close(self) -> None:
        self._pool.submit(self.conn.close).result()
        self._pool.shutdown()


class SqliteJournal:
    """The journal in one SQLite file (``journal.Journal``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = _Db(path)
        self.id = self._db.call(_journal_id)

    def token(self, migration: int) -> str:
        return f"{self.id}-{migration}"

    async def begin(self, vm: str, vm_identity: dict[str, Any], source: str, destination: str, mode: str,
                    plan: dict[str, Any], budget_ms: float, dedupe: str | None = None) -> int:
        row = (vm, json.dumps(vm_identity), source, destination, mode, json.dumps(plan), budget_ms,
               time.time(), dedupe)

        def insert(c: sqlite3.Connection) -> int:
            cur = c.execute("INSERT INTO migrations (vm, vm_identity, source, destination, mode, plan,"
                            " budget_ms, state, started, dedupe)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?, 'started', ?, ?)", row)
            return int(cur.lastrowid or 0)

        return await self._db.run(insert)

    async def state(self, migration: int, state: str, error: str | None = None) -> None:
        await self._exec("UPDATE migrations SET state = ?, error = coalesce(?, error) WHERE id = ?",
                         (state, error, migration))

    async def resolve(self, migration: int, destination: str, plan: dict[str, Any]) -> None:
        await self._exec("UPDATE migrations SET destination = ?, plan = ? WHERE id = ?",
                         (destination, json.dumps(plan), migration))

    async def finish(self, migration: int, outcome: str, error: str | None = None) -> None:
        await self._exec("UPDATE migrations SET state = ?, outcome = ?, error = ?, ended = ? WHERE id = ?",
                         (outcome, outcome, error, time.time(), migration))

    async def phase(self, migration: int, name: str, device: str, kinds: list[str] | tuple[str, ...]) -> int:
        row = (migration, name, device, ",".join(kinds), time.time())

        def insert(c: sqlite3.Connection) -> int:
            cur = c.execute("INSERT INTO phases (migration, name, device, kinds, started)"
                            " VALUES (?, ?, ?, ?, ?)", row)
            return int(cur.lastrowid or 0)

        return await self._db.run(insert)

    async def end_phase(self, migration: int, phase: int, outcome: str,
                        detail: dict[str, Any] | None = None) -> None:
        await self._exec("UPDATE phases SET ended = ?, outcome = ?, detail = ? WHERE id = ?",
                         (time.time(), outcome, json.dumps(detail or {}, default=str), phase))

    async def get(self, migration: int) -> Migration:
        found = await self._select("SELECT * FROM migrations WHERE id = ?", (migration,))
        if not found:
            raise KeyError(migration)
        return found[0]

    async def recent(self, limit: int = 100) -> list[Migration]:
        return await self._select("SELECT * FROM migrations ORDER BY id DESC LIMIT ?", (limit,))

    async def latest(self, vm: str, states: tuple[str, ...],
                     outcomes: tuple[str, ...] = ()) -> Migration | None:
        marks, omarks = ",".join("?" * len(states)), ",".join("?" * len(outcomes)) or "NULL"
        found = await self._select(
            f"SELECT * FROM migrations WHERE vm = ? AND state IN ({marks}) AND "
            f"(outcome IS NULL OR outcome IN ({omarks})) ORDER BY id DESC LIMIT 1", (vm, *states, *outcomes))
        return found[0] if found else None

    async def unfinished(self) -> list[Migration]:
        return await self._select("SELECT * FROM migrations WHERE outcome IS NULL ORDER BY id", ())

    async def seen(self, dedupe: str, within_s: float) -> int | None:
        def one(c: sqlite3.Connection) -> int | None:
            row = c.execute("SELECT id FROM migrations WHERE dedupe = ? AND started > ?"
                            " ORDER BY id DESC LIMIT 1", (dedupe, time.time() - within_s)).fetchone()
            return None if row is None else int(row[0])

        return await self._db.run(one)

    async def prune(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s

        def batch(c: sqlite3.Connection) -> int:
            # In batches: one long delete would hold the write lock (and this thread) for seconds.
            ids = [r[0] for r in c.execute("SELECT id FROM migrations WHERE ended IS NOT NULL AND ended < ?"
                                           " LIMIT ?", (cutoff, _PRUNE_BATCH))]
            if ids:
                marks = ",".join("?" * len(ids))
                c.execute("BEGIN")
                c.execute(f"DELETE FROM phases WHERE migration IN ({marks})", ids)
                c.execute(f"DELETE FROM migrations WHERE id IN ({marks})", ids)
                c.execute("COMMIT")
            return len(ids)

        total = 0
        while (n := await self._db.run(batch)):
            total += n
        return total

    async def close(self) -> None:
        self._db.close()

    def recent_now(self, limit: int) -> list[Migration]:
        """``recent`` from synchronous code (``xfer migrations``)."""
        return self._db.call(lambda c: _migrations(c, "SELECT * FROM migrations ORDER BY id DESC LIMIT ?",
                                                   (limit,)))

    def close_now(self) -> None:
        self._db.close()

    async def _exec(self, sql: str, args: tuple[Any, ...]) -> None:
        await self._db.run(lambda c: c.execute(sql, args))

    async def _select(self, sql: str, args: tuple[Any, ...]) -> list[Migration]:
        return await self._db.run(lambda c: _migrations(c, sql, args))


def _journal_id(c: sqlite3.Connection) -> str:
    c.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (secrets.token_hex(6),))
    return str(c.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()[0])


def _migrations(c: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[Migration]:
    rows = c.execute(sql, args).fetchall()
    out = []
    for row in rows:
        (mid, vm, ident, source, dest, mode, plan, budget, state, started, ended, outcome, error) = row[:13]
        phases = tuple(
            Phase(p[0], p[2], p[3], tuple(k for k in p[4].split(",") if k), p[5], p[6], p[7],
                  json.loads(p[8]) if p[8] else {})
            for p in c.execute("SELECT * FROM phases WHERE migration = ? ORDER BY id", (mid,)))
        out.append(Migration(mid, vm, json.loads(ident), source, dest, mode, json.loads(plan), budget, state,
                             started, ended, outcome, error, phases))
    return out


class SqliteStore:
    """The bundle store in the journal's SQLite file (``store.Store``)."""

    def __init__(self, path: Path, ttl_s: float = 60.0) -> None:
        self.ttl_s = ttl_s
        self._db = _Db(path)

    async def put_raw(self, migration: int, device: str, packed: bytes) -> None:
        row = (migration, device, packed, time.time() + self.ttl_s)
        await self._db.run(lambda c: c.execute("INSERT OR REPLACE INTO store VALUES (?, ?, ?, ?)", row))

    async def get_raw(self, migration: int, device: str) -> bytes | None:
        def one(c: sqlite3.Connection) -> bytes | None:
            row = c.execute("SELECT data FROM store WHERE migration = ? AND device = ? AND expires > ?",
                            (migration, device, time.time())).fetchone()
            return None if row is None else bytes(row[0])

        return await self._db.run(one)

    async def devices(self, migration: int) -> set[str]:
        def some(c: sqlite3.Connection) -> set[str]:
            rows = c.execute("SELECT device FROM store WHERE migration = ? AND expires > ?",
                             (migration, time.time()))
            return {str(r[0]) for r in rows}

        return await self._db.run(some)

    async def drop(self, migration: int) -> None:
        await self._db.run(lambda c: c.execute("DELETE FROM store WHERE migration = ?", (migration,)))

    async def expire(self) -> int:
        return await self._db.run(
            lambda c: int(c.execute("DELETE FROM store WHERE expires <= ?", (time.time(),)).rowcount))

    async def close(self) -> None:
        self._db.close()
