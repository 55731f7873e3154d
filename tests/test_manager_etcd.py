"""The etcd journal backend and the manager group (issue 18) against a real etcd on loopback:
journal and store semantics, fencing, chunked bundles, de-duplication across managers, one
leader among three, takeover with recovery, etcd restarted (no root)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.etcd_fixture import etcd, needs_etcd  # noqa: F401 - the fixture
from tests.manager_fakes import URL, FakeDevices, topo
from tests.test_manager_server import _setup
from xfer.errors import BundleError, MigrationMessageError
from xfer.lab.etcd import EtcdProcess
from xfer.manager import etcd as etcd_backend
from xfer.manager.config import JournalConfig
from xfer.manager.etcd import EtcdJournal, EtcdStore, Fenced
from xfer.manager.etcdclient import EtcdClient
from xfer.manager.leader import Election
from xfer.manager.migration import Migrator, Settings
from xfer.manager.recovery import settle
from xfer.manager.server import ManagerServer
from xfer.model import Kind
from xfer.net.message import Message, MigrationMessage
from xfer.net.notify import ManagerLink

pytestmark = needs_etcd
ALL = (Kind.CONNTRACK, Kind.DHCP, Kind.COUNTERS)
PLAN = {"routes": [{"kind": "conntrack", "source": "fw-a", "destinations": ["fw-b"]}]}
DAY = 86400.0


async def backend(url: str, prefix: str = "/t/") -> tuple[EtcdJournal, EtcdStore]:
    client = EtcdClient([url])
    journal = await EtcdJournal.open(client, prefix, DAY)
    return journal, EtcdStore(client, prefix, 60, journal)


def test_journal_records_migrations_phases_and_outcomes(etcd: EtcdProcess) -> None:  # noqa: F811
    async def scenario() -> None:
        j, _ = await backend(etcd.url)
        other, _ = await backend(etcd.url)
        assert other.id == j.id, "two managers must name migrations alike"
        a = await j.begin("vm1", {"id": "vm1"}, "hv1", "hv2", "relay", PLAN, 300, "id:m1")
        b = await j.begin("vm2", {"id": "vm2"}, "hv1", "hv2", "store", PLAN, 300)
        assert b > a
        p1 = await j.phase(a, "export", "fw-a", ["conntrack"])
        p2 = await j.phase(a, "import", "fw-b", ["conntrack"])
        await asyncio.gather(j.end_phase(a, p2, "ok", {"created": 3}), j.end_phase(a, p1, "ok"))
        await j.state(a, "committed")
        await j.state(b, "stored")
        rec = await other.get(a)
        assert [(p.name, p.outcome) for p in rec.phases] == [("export", "ok"), ("import", "ok")]
        assert rec.phases[1].detail == {"created": 3} and rec.state == "committed"
        assert [m.id for m in await other.unfinished()] == [a, b]
        assert (await other.latest("vm2", ("stored",))).id == b  # type: ignore[union-attr]
        assert await other.latest("vm1", ("stored",)) is None
        assert await other.seen("id:m1", 600) == a and await other.seen("id:other", 600) is None
        await j.finish(a, "cleaned")
        assert [m.id for m in await other.unfinished()] == [b]
        assert [m.id for m in await other.recent(10)] == [b, a]
        assert (await other.get(a)).outcome == "cleaned"
        with pytest.raises(KeyError):
            await other.get(10**9)
        await j.close()
        await other.close()

    asyncio.run(scenario())


def test_bundles_over_etcds_request_limit_are_chunked_and_oversized_ones_refused(
        etcd: EtcdProcess, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    async def scenario() -> None:
        j, s = await backend(etcd.url)
        big = bytes(range(256)) * (10 * 1024)          # 2.5 MiB: over etcd's 1.5 MiB per request
        await s.put_raw(7, "fw-a", big)
        await s.put_raw(7, "sw-a", b"small")
        assert await s.devices(7) == {"fw-a", "sw-a"}
        assert await s.get_raw(7, "fw-a") == big and await s.get_raw(7, "sw-a") == b"small"
        chunks = await j.client.range(b"/t/sc/", prefix=True, keys_only=True)
        assert len(chunks) == 4     # 3 of fw-a's, 1 of sw-a's
        await s.drop(7)
        assert await s.devices(7) == set() and await s.get_raw(7, "fw-a") is None
        monkeypatch.setattr(etcd_backend, "MAX_STORED", 1000)
        with pytest.raises(BundleError, match="over the etcd store's limit"):
            await s.put_raw(8, "fw-a", b"x" * 1001)
        assert await s.devices(8) == set()
        await j.close()

    asyncio.run(scenario())


def test_stored_bundles_expire_with_their_lease(etcd: EtcdProcess) -> None:  # noqa: F811
    async def scenario() -> None:
        j, _ = await backend(etcd.url)
        s = EtcdStore(j.client, "/t/", 1.0, j)
        await s.put_raw(1, "fw-a", b"x")
        assert await s.devices(1) == {"fw-a"}
        await asyncio.sleep(2.5)
        assert await s.devices(1) == set() and await s.get_raw(1, "fw-a") is None
        # Gone from etcd itself, not only hidden: the lease deleted the keys.
        assert await j.client.range(b"/t/s", prefix=True) == []
        await j.close()

    asyncio.run(scenario())


def test_one_leader_and_a_deposed_one_cannot_write(etcd: EtcdProcess) -> None:  # noqa: F811
    async def scenario() -> None:
        ja, _ = await backend(etcd.url)
        jb, _ = await backend(etcd.url)
        a = Election(ja.client, "/t/", "a", "https://a/v1/migrations", 1.0)
        b = Election(jb.client, "/t/", "b", "https://b/v1/migrations", 1.0)
        assert await a.campaign() and not await b.campaign()
        assert b.leader_url == "https://a/v1/migrations"
        ja.fence = a.fence
        mid = await ja.begin("vm1", {}, "hv1", "hv2", "relay", PLAN, 300)
        # a stops renewing (dies): its lease ends, b wins, and a's next write is refused.
        async with asyncio.timeout(6):     # etcd grants at least ~2 s, whatever is asked
            while not await b.campaign():
                await asyncio.sleep(0.2)
        jb.fence = b.fence
        with pytest.raises(Fenced):
            await ja.finish(mid, "committed")
        await jb.finish(mid, "rolled-back")
        assert (await jb.get(mid)).outcome == "rolled-back"
        await ja.close()
        await jb.close()

    asyncio.run(scenario())


def test_a_message_acted_on_by_one_manager_is_not_acted_on_again_by_the_next(
        etcd: EtcdProcess) -> None:  # noqa: F811
    """After a takeover the hook sends its message again: the new leader answers from the journal."""
    async def scenario() -> None:
        devices = FakeDevices()
        devices.put("fw-a", ALL)
        ja, sa = await backend(etcd.url)
        first = Migrator(topo(), devices, ja, sa, Settings())
        msg = Message("vm1", "not-running", "out", "hv1", "hv2", None, "relay", "hook-1")
        report = await first.handle(msg)
        await first.wait_background()
        calls = list(devices.calls)
        jb, sb = await backend(etcd.url)
        second = Migrator(topo(), devices, jb, sb, Settings())
        again = await second.handle(msg)
        assert again["duplicate"] and again["migration"] == report["migration"]
        assert devices.calls == calls, "the copy was acted on twice"
        await ja.close()
        await jb.close()

    asyncio.run(scenario())


def test_etcd_restarted_the_journal_goes_on_and_the_leader_keeps_its_lease(etcd: EtcdProcess) -> None:  # noqa: F811
    async def scenario() -> None:
        j, _ = await backend(etcd.url)
        e = Election(j.client, "/t/", "a", "https://a/v1/migrations", 5.0)
        assert await e.campaign()
        j.fence = e.fence
        mid = await j.begin("vm1", {}, "hv1", "hv2", "relay", PLAN, 300)
        await asyncio.to_thread(etcd.restart)
        # A write while etcd was away failed loudly; after it, writes and the lease go on.
        assert await e.renew()
        await j.state(mid, "committed")
        assert (await j.get(mid)).state == "committed"
        await j.close()

    asyncio.run(scenario())


def _group_config(tmp_path: Path, url: str) -> Any:
    cfg, ctx = _setup(tmp_path)
    backend_cfg = JournalConfig(backend="etcd", endpoints=(url,), prefix="/grp/", lease_s=1.5)
    return dataclasses.replace(cfg, backend=backend_cfg, udp=None), ctx


def test_three_managers_one_leader_the_others_redirect_and_a_takeover_recovers(
        tmp_path: Path, etcd: EtcdProcess) -> None:  # noqa: F811
    cfg, ctx = _group_config(tmp_path, etcd.url)
    devices = FakeDevices()
    devices.put("fw-a", ALL)

    async def leader_of(servers: list[ManagerServer]) -> ManagerServer:
        async with asyncio.timeout(10):
            while True:
                leading = [s for s in servers if s.leading]
                if len(leading) == 1:
                    return leading[0]
                assert len(leading) <= 1, "two leaders"
                await asyncio.sleep(0.05)

    async def scenario() -> None:
        servers = [ManagerServer(cfg, devices) for _ in range(3)]
        for s in servers:
            await s.start()
        try:
            leader = await leader_of(servers)
            followers = [s for s in servers if s is not leader]
            urls = ",".join(s.url for s in [*followers, leader])    # the leader last
            async with ManagerLink(urls, ctx) as link:
                report = await link.send(MigrationMessage("vm1", "not-running", "out", "hv1", "hv2", None,
                                                          "relay"), time.monotonic() + 10)
            assert report["state"] == "committed"
            await leader.migrator.wait_background()
            # A follower refuses to act, naming the leader.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
                body = {"vm": "vm1", "indication": "not-running", "direction": "out", "source": "hv2",
                        "destination": "hv1", "mode": "relay"}
                async with session.post(followers[0].url, json=body) as resp:
                    assert resp.status == 421
                    assert (await resp.json())["leader"] == leader.url
            assert len(await leader.migrator.journal.recent(10)) == 1, "the follower acted"
            # The leader dies mid-migration: fw-b's import hangs, then the leader is gone
            # without resigning (its lease must run out).
            devices.hang.add(URL["fw-a"])          # the destination of the move back
            ident = "move-back"
            moving = asyncio.ensure_future(leader.handle(
                {"vm": "vm1", "indication": "not-running", "direction": "out", "source": "hv2",
                 "destination": "hv1", "mode": "relay", "id": ident}, "http"))
            await asyncio.wait_for(devices.hanging.wait(), 5)
            mid = (await leader.migrator.journal.recent(1))[0].id
            started = time.monotonic()
            await crash(leader)
            moving.cancel()
            new = await leader_of(followers)
            took_s = time.monotonic() - started
            assert took_s < 10, f"takeover took {took_s:.1f} s (the lease is 1.5 s)"
            devices.hang.clear()
            devices.release.set()
            await asyncio.wait_for(settle(new.migrator.outcomes), 10)
            rec = await new.migrator.journal.get(mid)
            assert rec.outcome == "rolled-back" and "manager restarted" in (rec.error or ""), rec
            # The hook's resend reaches the new leader: answered from the journal, not redone.
            imports = len(devices.ops("import"))
            with pytest.raises(MigrationMessageError, match=r"rolled-back|failed"):
                async with ManagerLink(",".join(s.url for s in servers), ctx) as link:
                    await link.send({"vm": "vm1", "indication": "not-running", "direction": "out",
                                     "source": "hv2", "destination": "hv1", "mode": "relay", "id": ident},
                                    time.monotonic() + 10)
            assert len(devices.ops("import")) == imports
        finally:
            for s in servers:
                await s.stop()

    asyncio.run(scenario())


async def crash(server: ManagerServer) -> None:
    """As close to SIGKILL as one process allows: stop campaigning and renewing (no resign),
    stop listening, and drop the migrator without letting it journal anything more."""
    assert server.election is not None and isinstance(server._journal, EtcdJournal)
    # Dead: not one journal write more (a fence no leader key ever has).
    server._journal.fence = (server.election.key, -1)
    for task in server._daemons:
        task.cancel()
    server.election.fence = None
    for runner in server._runners:
        await runner.cleanup()
    server._runners.clear()
    server._migrator = None




def test_journal_section_is_checked() -> None:
    from xfer.errors import UsageError
    from xfer.manager.config import parse

    base = {"manager": {"topology": "t.yaml"}, "tls": {"cert": "c", "key": "k", "ca": "a"}}
    cfg = parse({**base, "journal": {"backend": "etcd", "endpoints": ["https://10.0.0.1:2379"],
                                     "prefix": "/dc1", "ca": "e.pem", "lease_s": 2}}, Path("/etc/xfer"))
    assert cfg.backend.prefix == "/dc1/" and cfg.backend.ca == Path("/etc/xfer/e.pem")
    assert parse(base).backend.backend == "sqlite"
    for bad, why in (({"backend": "zk"}, "must be sqlite or etcd"),
                     ({"backend": "etcd"}, "endpoints is required"),
                     ({"backend": "etcd", "endpoints": ["10.0.0.1:2379"]}, "http:// or https://"),
                     ({"retention_days": 0}, "positive"),
                     ({"cert": "c.pem"}, "go together"),
                     ({"shards": 3}, "unknown key")):
        with pytest.raises(UsageError, match=why):
            parse({**base, "journal": bad})
