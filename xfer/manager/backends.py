"""Open the journal and store backend a manager configuration names; keep them tidy.

    journal, store = open_backend(config)
    task = asyncio.ensure_future(maintain(journal, store, config.backend))
"""

from __future__ import annotations

import asyncio
import json
import logging

from xfer.errors import XferError
from xfer.manager.config import JournalConfig, ManagerConfig
from xfer.manager.journal import Journal
from xfer.manager.sqlite import SqliteJournal, SqliteStore
from xfer.manager.store import Store

log = logging.getLogger("xfer.manager")
DAY_S = 86400.0


def open_backend(config: ManagerConfig) -> tuple[Journal, Store]:
    """The journal and bundle store of ``config`` (``[journal] backend``); SQLite by default."""
    return SqliteJournal(config.journal), SqliteStore(config.journal, config.store_ttl_s)


async def maintain_once(journal: Journal, store: Store, cfg: JournalConfig) -> dict[str, int]:
    """Delete expired bundles and migrations past retention; returns how many of each."""
    return {"bundles": await store.expire(), "migrations": await journal.prune(cfg.retention_days * DAY_S)}


async def maintain(journal: Journal, store: Store, cfg: JournalConfig) -> None:
    """``maintain_once`` every ``maintenance_s`` for as long as the manager runs (cancel to stop)."""
    while True:
        try:
            done = await maintain_once(journal, store, cfg)
            if any(done.values()):
                log.info(json.dumps({"event": "maintenance", **done}))
        except XferError as exc:
            log.error(json.dumps({"event": "maintenance failed", "error": str(exc)}))
        await asyncio.sleep(cfg.maintenance_s)
