"""The manager's bundle store (store mode): bundles deposited on "out", collected on "in".

Kept with the journal (the same backend: ``sqlite.py`` or ``etcd.py``) so a
restarted or newly elected manager still has them, zstd-compressed as they
travel (writing 4.5 MB of a 20k-entry bundle to SQLite costs ~30 ms inside the
window, its 0.2 MB compressed form ~2 ms); each expires ``ttl_s`` after its
deposit (a VM whose "in" never comes must not keep a copy of its firewall state
around for ever).

    await store.put(7, "fw-a", b"...")
    await store.get(7) -> {"fw-a": b"..."}

In the device-driven variant bundles arrive from the agents already compressed and
leave the same way: ``put_raw``/``get_raw`` keep them as they travel (the agents,
not the manager, check what is inside).
"""

from __future__ import annotations

from typing import Protocol

from xfer.bundle import DEFAULT_MAX_SIZE
from xfer.net.api import ZSTD, compress, decompress


class Store(Protocol):
    """What the manager needs of a bundle store backend."""

    ttl_s: float

    async def put_raw(self, migration: int, device: str, packed: bytes) -> None:
        """Store a bundle as it travels (zstd), for ``ttl_s``."""
        ...

    async def get_raw(self, migration: int, device: str) -> bytes | None:
        """One unexpired bundle as it travels (zstd), or None."""
        ...

    async def devices(self, migration: int) -> set[str]:
        """The source devices whose bundle of ``migration`` is here and unexpired."""
        ...

    async def drop(self, migration: int) -> None: ...

    async def expire(self) -> int:
        """Delete expired bundles; returns how many."""
        ...

    async def close(self) -> None: ...


async def put(store: Store, migration: int, device: str, data: bytes) -> None:
    """Compress ``data`` and store it as ``device``'s bundle of ``migration``."""
    await store.put_raw(migration, device, compress(data)[0])


async def get(store: Store, migration: int) -> dict[str, bytes]:
    """The unexpired bundles of a migration, inflated, by source device ({} when none or expired).

        bundles = await get(store, 7)
    """
    out = {}
    for device in sorted(await store.devices(migration)):
        packed = await store.get_raw(migration, device)
        if packed is not None:
            out[device] = decompress(packed, ZSTD, DEFAULT_MAX_SIZE)
    return out
