"""Recovery tells the truth (issue 12.1): a rollback that did not happen is never journaled as
done; it stays rollback-pending, is retried with backoff in the background, holds up neither the
manager nor the other migrations, and keeps its VM from migrating again until it is done."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.manager_fakes import URL, FakeDevices, topo
from xfer.errors import Conflict, MigrationFailed
from xfer.manager.journal import ROLLBACK_PENDING
from xfer.manager.migration import Migrator, Settings
from xfer.manager.recovery import settle
from xfer.manager.sqlite import SqliteJournal, SqliteStore
from xfer.model import Kind
from xfer.net.message import Message

PLAN_B = {"routes": [{"kind": "conntrack", "source": "fw-a", "destinations": ["fw-b"]}]}
PLAN_C = {"routes": [{"kind": "conntrack", "source": "fw-a", "destinations": ["fw-c"]}]}


def make(tmp_path: Path, devices: FakeDevices) -> Migrator:
    db = tmp_path / "m.db"
    m = Migrator(topo(), devices, SqliteJournal(db), SqliteStore(db), Settings())
    m.outcomes.retry_first_s = 0.05
    return m


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


def test_a_failed_rollback_stays_pending_and_is_retried_until_done(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from xfer.manager import migration

    # a "migrating" right after a "not-running" is refused as late; here it is a new migration
    monkeypatch.setattr(migration, "LATE_MIGRATING_S", 0.0)

    async def scenario() -> None:
        devices = FakeDevices()
        devices.put("fw-a", [Kind.CONNTRACK, Kind.DHCP, Kind.COUNTERS])
        devices.fail.add(URL["sw-b"])              # the migration fails at a destination ...
        devices.unreachable.add(URL["fw-b"])       # ... and one destination cannot be rolled back
        m = make(tmp_path, devices)
        with pytest.raises(MigrationFailed, match="rollback is pending"):
            await m.handle(Message("vm1", "not-running", "out", "hv1", "hv2", None, "relay"))
        mid = (await m.journal.recent(1))[0].id
        rec = await m.journal.get(mid)
        assert rec.state == ROLLBACK_PENDING and rec.outcome is None, rec
        assert "fw-b" in (rec.error or "")
        # The VM may not migrate again while a rollback could still land on top of it.
        with pytest.raises(Conflict, match="still pending"):
            await m.handle(Message("vm1", "not-running", "out", "hv1", "hv2", None, "relay"))
        # Nor be pre-copied: the rollback would delete what a pre-copy stages.
        started = len(await m.journal.recent(10))
        with pytest.raises(Conflict, match="still pending"):
            await m.handle(Message("vm1", "migrating", "out", "hv1", "hv2", None, "relay"))
        assert len(await m.journal.recent(10)) == started, "a refused pre-copy was journaled"
        await asyncio.sleep(0.3)
        assert (await m.journal.get(mid)).outcome is None, "journaled done while the device was unreachable"
        tries = len([c for c in devices.ops("forget") if c[0] == URL["fw-b"]])
        assert tries >= 3, f"retried {tries} times in 0.3 s"
        devices.unreachable.clear()
        await wait_for(lambda: _outcome_is(m, mid, "rolled-back"))
        assert not devices.has("fw-b", Kind.CONNTRACK)
        assert m.outcomes.pending == {}
        await m.journal.close()

    asyncio.run(scenario())


async def _outcome_is(m: Migrator, mid: int, outcome: str) -> bool:
    return (await m.journal.get(mid)).outcome == outcome


def test_recovery_returns_at_once_and_one_unreachable_device_holds_up_no_other(tmp_path: Path) -> None:
    async def scenario() -> None:
        devices = FakeDevices()
        db = tmp_path / "m.db"
        j = SqliteJournal(db)
        ident = topo().vm("vm1").to_dict()
        to_b = await j.begin("vm1", ident, "hv1", "hv2", "relay", PLAN_B, 300)
        to_c = await j.begin("vm1", ident, "hv1", "hv3", "relay", PLAN_C, 300)
        await j.close()
        devices.put("fw-b", [Kind.CONNTRACK])
        devices.put("fw-c", [Kind.CONNTRACK])
        devices.unreachable.add(URL["fw-b"])
        m = make(tmp_path, devices)
        actions = await asyncio.wait_for(m.recover(), 2.0)
        assert [a["action"] for a in actions] == ["rolling back", "rolling back"]
        await wait_for(lambda: _outcome_is(m, to_c, "rolled-back"))
        assert not devices.has("fw-c", Kind.CONNTRACK)
        stuck = await m.journal.get(to_b)
        assert stuck.state == ROLLBACK_PENDING and stuck.outcome is None
        assert devices.has("fw-b", Kind.CONNTRACK)
        devices.unreachable.clear()
        await asyncio.wait_for(settle(m.outcomes), 5.0)
        assert (await m.journal.get(to_b)).outcome == "rolled-back"
        assert not devices.has("fw-b", Kind.CONNTRACK)
        await m.journal.close()

    asyncio.run(scenario())


def test_a_pending_rollback_survives_a_restart(tmp_path: Path) -> None:
    """Stopped while a rollback is pending: the next run finds it unfinished and finishes it."""
    async def scenario() -> None:
        devices = FakeDevices()
        db = tmp_path / "m.db"
        j = SqliteJournal(db)
        mid = await j.begin("vm1", topo().vm("vm1").to_dict(), "hv1", "hv2", "relay", PLAN_B, 300)
        await j.close()
        devices.put("fw-b", [Kind.CONNTRACK])
        devices.unreachable.add(URL["fw-b"])
        first = make(tmp_path, devices)
        await first.recover()
        await asyncio.sleep(0.2)
        await first.outcomes.stop_retries()
        await first.journal.close()
        devices.unreachable.clear()
        second = make(tmp_path, devices)
        assert (await second.journal.get(mid)).state == ROLLBACK_PENDING
        await second.recover()
        await asyncio.wait_for(settle(second.outcomes), 5.0)
        assert (await second.journal.get(mid)).outcome == "rolled-back"
        await second.journal.close()

    asyncio.run(scenario())


def test_pending_rollbacks_are_a_metric(tmp_path: Path) -> None:
    import time

    import aiohttp

    from tests.test_manager_server import _setup, msg
    from xfer.errors import MigrationMessageError
    from xfer.manager.server import ManagerServer
    from xfer.net.notify import send_migration_message

    cfg, ctx = _setup(tmp_path)
    devices = FakeDevices()
    devices.put("fw-a", [Kind.CONNTRACK, Kind.DHCP, Kind.COUNTERS])
    devices.fail.add(URL["sw-b"])
    devices.unreachable.add(URL["fw-b"])

    async def metric(server: ManagerServer) -> str:
        url = server.url.replace("/v1/migrations", "/metrics")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s, s.get(url) as r:
            return next(line for line in (await r.text()).splitlines()
                        if line.startswith("xfer_manager_rollbacks_pending "))

    async def scenario() -> None:
        async with ManagerServer(cfg, devices) as server:
            assert await metric(server) == "xfer_manager_rollbacks_pending 0.0"
            with pytest.raises(MigrationMessageError, match="rollback is pending"):
                await send_migration_message(server.url, msg(mode="relay"), time.monotonic() + 5, ctx)
            assert await metric(server) == "xfer_manager_rollbacks_pending 1.0"
            server.migrator.outcomes.retry_first_s = 0.05
            devices.unreachable.clear()
            await asyncio.wait_for(settle(server.migrator.outcomes), 40)
            assert await metric(server) == "xfer_manager_rollbacks_pending 0.0"

    asyncio.run(scenario())
