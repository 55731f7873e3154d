"""Open the journal and store backend a manager configuration names; keep them tidy.

    journal, store = await open_backend(config)
    task = asyncio.ensure_future(maintain(journal, store, config.backend))
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl

from xfer.errors import XferError
from xfer.manager.config import JournalConfig, ManagerConfig
from xfer.manager.etcd import EtcdJournal, EtcdStore
from xfer.manager.etcdclient import EtcdClient
from xfer.manager.journal import Journal
from xfer.manager.sqlite import SqliteJournal, SqliteStore
from xfer.manager.store import Store
from xfer.net import tls

log = logging.getLogger("xfer.manager")
DAY_S = 86400.0


async def open_backend(config: ManagerConfig) -> tuple[Journal, Store]:
    """The journal and bundle store of ``config`` (``[journal] backend``); SQLite by default."""
    cfg = config.backend
    if cfg.backend == "sqlite":
        return SqliteJournal(config.journal), SqliteStore(config.journal, config.store_ttl_s)
    ctx = None
    if any(e.startswith("https://") for e in cfg.endpoints):
        files = (cfg.tls.cert, cfg.tls.key) if cfg.tls else (None, None)
        ctx = tls.client_tls(cfg.ca, *files) or ssl.create_default_context()
    client = EtcdClient(cfg.endpoints, ctx)
    try:
        journal = await EtcdJournal.open(client, cfg.prefix, cfg.retention_days * DAY_S)
    except BaseException:
        await client.close()
        raise
    return journal, EtcdStore(client, cfg.prefix, config.store_ttl_s, journal)


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
