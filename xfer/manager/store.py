"""The manager's bundle store (store mode): bundles deposited on "out", collected on "in".

Kept in the journal's SQLite file so a restarted manager still has them,
zstd-compressed as they travel (writing 4.5 MB of a 20k-entry bundle to SQLite
costs ~30 ms inside the window, its 0.2 MB compressed form ~2 ms); each
expires ``ttl_s`` after its deposit (a VM whose "in" never comes must not keep
a copy of its firewall state around for ever).

    store = Store(Path("/var/lib/xfer/manager.db"), ttl_s=60)
    store.put(7, "fw-a", b"...")
    store.get(7) -> {"fw-a": b"..."}

In the device-driven variant bundles arrive from the agents already compressed and
leave the same way: ``put_raw``/``get_raw`` keep them as they travel (the agents,
not the manager, check what is inside).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from xfer.bundle import DEFAULT_MAX_SIZE
from xfer.net.api import ZSTD, compress, decompress

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store (
    migration INTEGER NOT NULL, device TEXT NOT NULL, data BLOB NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (migration, device)
);
"""


class Store:
    def __init__(self, path: Path, ttl_s: float = 60.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Like the journal: durable against a manager crash, no fsync per bundle inside
        # the pause window. A bundle lost with the machine costs nothing: the source
        # keeps its state until the destination has committed.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def put(self, migration: int, device: str, data: bytes) -> None:
        self.put_raw(migration, device, compress(data)[0])

    def put_raw(self, migration: int, device: str, packed: bytes) -> None:
        """Store a bundle as it travels (zstd), for ``ttl_s``."""
        self._db.execute("INSERT OR REPLACE INTO store VALUES (?, ?, ?, ?)",
                         (migration, device, packed, time.time() + self.ttl_s))

    def get_raw(self, migration: int, device: str) -> bytes | None:
        """One unexpired bundle as it travels (zstd), or None."""
        row = self._db.execute("SELECT data FROM store WHERE migration = ? AND device = ? AND expires > ?",
                               (migration, device, time.time())).fetchone()
        return None if row is None else bytes(row[0])

    def devices(self, migration: int) -> set[str]:
        """The source devices whose bundle of ``migration`` is here and unexpired."""
        rows = self._db.execute("SELECT device FROM store WHERE migration = ? AND expires > ?",
                                (migration, time.time())).fetchall()
        return {str(r[0]) for r in rows}

    def get(self, migration: int) -> dict[str, bytes]:
        """The unexpired bundles of a migration, by source device ({} when none or expired)."""
        rows = self._db.execute("SELECT device, data FROM store WHERE migration = ? AND expires > ?",
                                (migration, time.time())).fetchall()
        return {str(d): decompress(bytes(b), ZSTD, DEFAULT_MAX_SIZE) for d, b in rows}

    def drop(self, migration: int) -> None:
        self._db.execute("DELETE FROM store WHERE migration = ?", (migration,))

    def expire(self) -> int:
        """Delete expired bundles; returns how many."""
        return int(self._db.execute("DELETE FROM store WHERE expires <= ?", (time.time(),)).rowcount)
