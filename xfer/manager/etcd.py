"""The highly available journal and store backend: etcd, shared by several managers.

Only the elected leader (``leader.py``) writes, and every write is a transaction
that also compares the leader key's creation revision with the one this manager
won: a manager that lost its lease cannot write a line more (it is fenced).

Keys under the configured prefix P::

    P meta/id                 the journal's name (agents know migrations as "ID-N")
    P leader                  the leader's name and URL, bound to its lease
    P seq                     written to draw migration ids (the revision of the write)
    P m/<id:016>              a migration with its phases (JSON)
    P open/<id:016>           a migration with no outcome yet (what recovery reads)
    P vm/<vm>/<id:016>        the VM's migrations, newest last, with state and outcome
    P d/<sha256>              a message id's migration (de-duplication across managers)
    P sm/<id:016>/<device>    a stored bundle's header: size, chunk count, expiry
    P sc/<id:016>/<device>/<i:04>  its chunks

Finished migrations (and their VM index keys) are rewritten bound to a lease of
``retention_days``: etcd deletes them itself, no pruning pass. Stored bundles are
bound to a lease of ``store_ttl_s`` the same way.

Bundle size: etcd refuses requests over 1.5 MiB by default (``--max-request-bytes``),
so a bundle (zstd-compressed as it travels, ~0.2 MB for 20k conntrack entries) is
split into values of at most 1 MiB written one by one, its header last (a bundle
is there whole or not at all); bundles over ``MAX_STORED`` (64 MiB compressed) are
refused: etcd keeps everything in memory and its default space quota is 2 GiB.

    journal = await EtcdJournal.open(client, "/xfer/", retention_s=30 * 86400)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from typing import Any

from xfer.errors import BundleError
from xfer.manager.etcdclient import MAX_VALUE, EtcdClient, EtcdError, KeyValue, Txn, range_values
from xfer.manager.journal import Migration, Phase

MAX_STORED = 64 * 1024 * 1024


class Fenced(EtcdError):
    """This manager is no longer the leader: the journal refused its write."""


def _mkey(mid: int) -> str:
    return f"{mid:016d}"


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()


class EtcdJournal:
    """The journal in etcd (``journal.Journal``); ``fence`` is set by the election."""

    def __init__(self, client: EtcdClient, prefix: str, journal_id: str, retention_s: float) -> None:
        self.client, self.key, self.id = client, _Keys(prefix), journal_id
        self.retention_s = retention_s
        # (leader key, its creation revision) while this manager leads; every write compares it.
        self.fence: tuple[bytes, int] | None = None
        self._cache: dict[int, tuple[dict[str, Any], int]] = {}   # mid -> (record, mod revision)
        self._locks: dict[int, asyncio.Lock] = {}
        self._leases: dict[str, tuple[int, float]] = {}          # purpose -> (lease, renew after)

    @classmethod
    async def open(cls, client: EtcdClient, prefix: str, retention_s: float) -> EtcdJournal:
        """The journal under ``prefix``, named on first use (every manager then shares the name)."""
        key = (prefix + "meta/id").encode()
        txn = Txn().created_at(key, 0).put(key, secrets.token_hex(6).encode()).otherwise_get(key)
        ok, responses, _ = await client.txn(txn)
        if ok:
            found = await client.get(key)
            assert found is not None
            return cls(client, prefix, found.value.decode(), retention_s)
        return cls(client, prefix, range_values(responses)[0].value.decode(), retention_s)

    def token(self, migration: int) -> str:
        return f"{self.id}-{migration}"

    # --- writes --------------------------------------------------------------------------------

    def _txn(self) -> Txn:
        txn = Txn()
        if self.fence is not None:
            txn.created_at(*self.fence)
        return txn

    async def _commit(self, txn: Txn, what: str) -> int:
        ok, _, revision = await self.client.txn(txn)
        if not ok:
            raise Fenced(f"journal write refused ({what}): this manager is no longer the leader, or "
                         "another manager wrote the same migration")
        return revision

    async def begin(self, vm: str, vm_identity: dict[str, Any], source: str, destination: str, mode: str,
                    plan: dict[str, Any], budget_ms: float, dedupe: str | None = None) -> int:
        # The id is the revision of a write: unique and increasing across managers and restarts.
        mid = await self._commit(self._txn().put(self.key("seq"), b""), "a new migration id")
        now = time.time()
        record = {"id": mid, "vm": vm, "vm_identity": vm_identity, "source": source,
                  "destination": destination, "mode": mode, "plan": plan, "budget_ms": budget_ms,
                  "state": "started", "started": now, "ended": None, "outcome": None, "error": None,
                  "phases": []}
        txn = self._txn().created_at(self.key("m", _mkey(mid)), 0)
        txn.put(self.key("m", _mkey(mid)), _json(record)).put(self.key("open", _mkey(mid)), b"")
        txn.put(self.key("vm", vm, _mkey(mid)), _json({"state": "started", "outcome": None}))
        if dedupe:
            txn.put(self.key("d", _digest(dedupe)), _json({"migration": mid, "started": now}),
                    lease=await self._lease("dedupe", 1800.0))
        revision = await self._commit(txn, f"migration {mid}")
        self._cache[mid] = (record, revision)
        return mid

    async def _update(self, mid: int, change: dict[str, Any], finished: bool = False) -> dict[str, Any]:
        """Read-modify-write one migration, compared on its revision (and the fence)."""
        lock = self._locks.setdefault(mid, asyncio.Lock())
        async with lock:
            record, revision = await self._cached(mid)
            record = {**record, **change}
            key = self.key("m", _mkey(mid))
            lease = await self._lease("retention", self.retention_s) if finished else 0
            txn = self._txn().modified_at(key, revision).put(key, _json(record), lease)
            index = self.key("vm", record["vm"], _mkey(mid))
            txn.put(index, _json({"state": record["state"], "outcome": record["outcome"]}), lease)
            if finished:
                txn.delete(self.key("open", _mkey(mid)))
            new_revision = await self._commit(txn, f"migration {mid}")
            self._cache[mid] = (record, new_revision)
            return record

    async def _cached(self, mid: int) -> tuple[dict[str, Any], int]:
        if mid not in self._cache:
            kv = await self.client.get(self.key("m", _mkey(mid)))
            if kv is None:
                raise KeyError(mid)
            self._cache[mid] = (json.loads(kv.value), kv.mod_revision)
        return self._cache[mid]

    async def state(self, migration: int, state: str, error: str | None = None) -> None:
        change: dict[str, Any] = {"state": state}
        if error is not None:
            change["error"] = error
        await self._update(migration, change)

    async def resolve(self, migration: int, destination: str, plan: dict[str, Any]) -> None:
        await self._update(migration, {"destination": destination, "plan": plan})

    async def finish(self, migration: int, outcome: str, error: str | None = None) -> None:
        await self._update(migration, {"state": outcome, "outcome": outcome, "error": error,
                                       "ended": time.time()}, finished=True)
        # Finished: nothing writes it again but retention.
        self._cache.pop(migration, None)
        self._locks.pop(migration, None)

    async def phase(self, migration: int, name: str, device: str, kinds: list[str] | tuple[str, ...]) -> int:
        phase: dict[str, Any] = {"id": 0, "name": name, "device": device, "kinds": list(kinds),
                                 "started": time.time(), "ended": None, "outcome": None, "detail": {}}
        # Numbered under the migration's lock: concurrent phases of one migration each get theirs.
        await self._append(migration, phase)
        return int(phase["id"])

    async def _append(self, mid: int, phase: dict[str, Any]) -> None:
        lock = self._locks.setdefault(mid, asyncio.Lock())
        async with lock:
            record, revision = await self._cached(mid)
            phase["id"] = len(record["phases"]) + 1
            record = {**record, "phases": [*record["phases"], phase]}
            key = self.key("m", _mkey(mid))
            new_revision = await self._commit(self._txn().modified_at(key, revision).put(key, _json(record)),
                                              f"migration {mid}")
            self._cache[mid] = (record, new_revision)

    async def end_phase(self, migration: int, phase: int, outcome: str,
                        detail: dict[str, Any] | None = None) -> None:
        lock = self._locks.setdefault(migration, asyncio.Lock())
        async with lock:
            record, revision = await self._cached(migration)
            phases = [dict(p) for p in record["phases"]]
            for p in phases:
                if p["id"] == phase:
                    p.update(ended=time.time(), outcome=outcome, detail=json.loads(json.dumps(detail or {},
                                                                                              default=str)))
            record = {**record, "phases": phases}
            key = self.key("m", _mkey(migration))
            new_revision = await self._commit(self._txn().modified_at(key, revision).put(key, _json(record)),
                                              f"migration {migration}")
            self._cache[migration] = (record, new_revision)

    async def _lease(self, purpose: str, ttl_s: float) -> int:
        """A lease shared by the keys written for ``purpose`` within the next hour (or a tenth of
        its TTL): one grant per period instead of one per key; each key lives TTL to TTL + period."""
        lease, renew_after = self._leases.get(purpose, (0, 0.0))
        now = time.monotonic()
        if not lease or now >= renew_after:
            period = min(3600.0, ttl_s / 10)
            lease = await self.client.grant(ttl_s + period)
            self._leases[purpose] = (lease, now + period)
        return lease

    # --- reads ---------------------------------------------------------------------------------

    async def get(self, migration: int) -> Migration:
        if migration in self._cache and self.fence is not None:
            # The leader's copy of a migration it writes is the journal's (writes are fenced).
            return _migration(self._cache[migration][0])
        kv = await self.client.get(self.key("m", _mkey(migration)))
        if kv is None:
            raise KeyError(migration)
        return _migration(json.loads(kv.value))

    async def recent(self, limit: int = 100) -> list[Migration]:
        kvs = await self.client.range(self.key("m", ""), prefix=True, limit=limit, descending=True)
        return [_migration(json.loads(kv.value)) for kv in kvs]

    async def latest(self, vm: str, states: tuple[str, ...],
                     outcomes: tuple[str, ...] = ()) -> Migration | None:
        for kv in await self.client.range(self.key("vm", vm, ""), prefix=True, descending=True, limit=50):
            index = json.loads(kv.value)
            if index["state"] in states and (index["outcome"] is None or index["outcome"] in outcomes):
                return await self.get(int(kv.key.rsplit(b"/", 1)[1]))
        return None

    async def unfinished(self) -> list[Migration]:
        out = []
        for kv in await self.client.range(self.key("open", ""), prefix=True, keys_only=True):
            mid = int(kv.key.rsplit(b"/", 1)[1])
            try:
                out.append(await self.get(mid))
            except KeyError:
                continue
        return sorted(out, key=lambda m: m.id)

    async def seen(self, dedupe: str, within_s: float) -> int | None:
        kv = await self.client.get(self.key("d", _digest(dedupe)))
        if kv is None:
            return None
        found = json.loads(kv.value)
        return int(found["migration"]) if found["started"] > time.time() - within_s else None

    async def prune(self, older_than_s: float) -> int:
        """Nothing to do: finished migrations are bound to a retention lease etcd expires."""
        return 0

    async def close(self) -> None:
        await self.client.close()


class EtcdStore:
    """Deposited bundles in etcd (``store.Store``), chunked, bound to a lease of ``ttl_s``."""

    def __init__(self, client: EtcdClient, prefix: str, ttl_s: float, journal: EtcdJournal) -> None:
        self.client, self.key, self.ttl_s = client, _Keys(prefix), ttl_s
        self._journal = journal     # for its fence

    async def put_raw(self, migration: int, device: str, packed: bytes) -> None:
        if len(packed) > MAX_STORED:
            raise BundleError(f"bundle of {device} is {len(packed)} bytes compressed: over the etcd store's "
                              f"limit of {MAX_STORED} (etcd keeps every value in memory)")
        lease = await self.client.grant(self.ttl_s)
        chunks = [packed[i:i + MAX_VALUE] for i in range(0, len(packed), MAX_VALUE)] or [b""]
        for i, chunk in enumerate(chunks):
            await self._write(self._journal._txn().put(self.key("sc", _mkey(migration), device, f"{i:04d}"),
                                                       chunk, lease))
        header = {"size": len(packed), "chunks": len(chunks), "expires": time.time() + self.ttl_s,
                  "sha256": hashlib.sha256(packed).hexdigest()}
        await self._write(self._journal._txn().put(self.key("sm", _mkey(migration), device), _json(header),
                                                   lease))

    async def _write(self, txn: Txn) -> None:
        await self._journal._commit(txn, "a stored bundle")

    async def get_raw(self, migration: int, device: str) -> bytes | None:
        header = await self.client.get(self.key("sm", _mkey(migration), device))
        if header is None:
            return None
        meta = json.loads(header.value)
        if meta["expires"] <= time.time():
            return None
        chunks = await self.client.range(self.key("sc", _mkey(migration), device, ""), prefix=True)
        packed = b"".join(kv.value for kv in chunks)
        if len(chunks) != meta["chunks"] or hashlib.sha256(packed).hexdigest() != meta["sha256"]:
            return None     # expired between the two reads, or incomplete: as good as gone
        return packed

    async def devices(self, migration: int) -> set[str]:
        now = time.time()
        kvs: list[KeyValue] = await self.client.range(self.key("sm", _mkey(migration), ""), prefix=True)
        return {kv.key.rsplit(b"/", 1)[1].decode() for kv in kvs if json.loads(kv.value)["expires"] > now}

    async def drop(self, migration: int) -> None:
        await self.client.delete(self.key("sm", _mkey(migration), ""), prefix=True)
        await self.client.delete(self.key("sc", _mkey(migration), ""), prefix=True)

    async def expire(self) -> int:
        """Nothing to do: etcd deletes a bundle when its lease ends."""
        return 0

    async def close(self) -> None:
        """The client is the journal's: it closes it."""


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


def _digest(dedupe: str) -> str:
    return hashlib.sha256(dedupe.encode()).hexdigest()


def _migration(r: dict[str, Any]) -> Migration:
    phases = tuple(Phase(p["id"], p["name"], p["device"], tuple(p["kinds"]), p["started"], p["ended"],
                         p["outcome"], p.get("detail") or {}) for p in r["phases"])
    return Migration(r["id"], r["vm"], r["vm_identity"], r["source"], r["destination"], r["mode"], r["plan"],
                     r["budget_ms"], r["state"], r["started"], r["ended"], r["outcome"], r["error"], phases)
