"""The SQLite journal backend at scale (issue 12.5): indexed, pruned, off the event loop,
bundles expired while the manager runs."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from xfer.manager.backends import maintain
from xfer.manager.config import JournalConfig
from xfer.manager.sqlite import SqliteJournal, SqliteStore

PLAN = {"routes": [{"kind": "conntrack", "source": "fw-a", "destinations": ["fw-b"]}]}


def plans(db: Path) -> dict[str, str]:
    """EXPLAIN QUERY PLAN of each query the manager runs per migration or per listing."""
    c = sqlite3.connect(db)
    queries = {
        "phases of a migration": "SELECT * FROM phases WHERE migration = 7 ORDER BY id",
        "unfinished": "SELECT * FROM migrations WHERE outcome IS NULL ORDER BY id",
        "latest of a VM": "SELECT * FROM migrations WHERE vm = 'vm1' AND state IN ('stored') AND "
                          "(outcome IS NULL OR outcome IN (NULL)) ORDER BY id DESC LIMIT 1",
        "retention": "SELECT id FROM migrations WHERE ended IS NOT NULL AND ended < 5 LIMIT 10",
        "message id": "SELECT id FROM migrations WHERE dedupe = 'id:x' AND started > 5",
        "expired bundles": "DELETE FROM store WHERE expires <= 5",
    }
    out = {}
    for name, sql in queries.items():
        out[name] = " | ".join(str(r[-1]) for r in c.execute("EXPLAIN QUERY PLAN " + sql))
    c.close()
    return out


def test_every_per_migration_query_uses_an_index(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    asyncio.run(SqliteJournal(db).close())
    asyncio.run(SqliteStore(db).close())
    for name, plan in plans(db).items():
        # "SCAN table" without an index reads every row: cost grows with the journal.
        assert "USING" in plan and not plan.startswith("SCAN phases"), f"{name}: {plan}"


def test_retention_prunes_old_finished_migrations_and_their_phases_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        j = SqliteJournal(tmp_path / "m.db")
        old = await j.begin("vm1", {}, "hv1", "hv2", "relay", PLAN, 300)
        await j.phase(old, "export", "fw-a", ["conntrack"])
        await j.finish(old, "cleaned")
        open_ = await j.begin("vm2", {}, "hv1", "hv2", "relay", PLAN, 300)
        assert await j.prune(3600) == 0          # nothing ended an hour ago yet
        await asyncio.sleep(0.05)
        recent = await j.begin("vm3", {}, "hv1", "hv2", "relay", PLAN, 300)
        await j.finish(recent, "cleaned")
        assert await j.prune(0.04) == 1          # only the one that ended before the cutoff
        with pytest.raises(KeyError):
            await j.get(old)
        assert [m.id for m in await j.unfinished()] == [open_]   # under way: never pruned
        assert (await j.get(recent)).outcome == "cleaned"
        await j.close()
        c = sqlite3.connect(tmp_path / "m.db")
        assert c.execute("SELECT count(*) FROM phases WHERE migration = ?", (old,)).fetchone()[0] == 0

    asyncio.run(scenario())


def test_journal_io_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    """Another writer holds the database for 0.6 s: the journal's write waits for it on its own
    thread while the loop keeps serving (before: the loop itself blocked inside sqlite3)."""
    db = tmp_path / "m.db"

    async def scenario() -> None:
        j = SqliteJournal(db)
        blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        threading.Timer(0.6, lambda: blocker.execute("COMMIT")).start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        started = time.monotonic()
        await j.begin("vm1", {}, "hv1", "hv2", "relay", PLAN, 300)
        waited = time.monotonic() - started
        t.cancel()
        blocker.close()
        await j.close()
        assert waited >= 0.5, "the write did not wait for the lock: the test proves nothing"
        assert ticks >= 10, f"the loop ran {ticks} times in {waited:.2f} s: it was blocked"

    asyncio.run(scenario())


def test_expired_bundles_are_deleted_while_the_manager_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        db = tmp_path / "m.db"
        j, s = SqliteJournal(db), SqliteStore(db, ttl_s=0.2)
        await s.put_raw(1, "fw-a", b"x" * 100)
        task = asyncio.ensure_future(maintain(j, s, JournalConfig(maintenance_s=0.1)))
        await asyncio.sleep(0.6)
        task.cancel()
        c = sqlite3.connect(db)
        rows = c.execute("SELECT count(*) FROM store").fetchone()[0]
        c.close()
        await j.close()
        await s.close()
        assert rows == 0, "the expired bundle is still in the database"

    asyncio.run(scenario())
