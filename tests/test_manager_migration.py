"""Modes, commit/rollback/cleanup, abort and journal recovery against fake agents (no root)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.manager_fakes import TOPOLOGY, URL, FakeDevices, topo
from xfer.errors import UsageError
from xfer.manager import topology
from xfer.manager.journal import Journal
from xfer.manager.migration import MigrationFailed, Migrator, Settings
from xfer.manager.recovery import settle
from xfer.manager.sqlite import SqliteJournal, SqliteStore
from xfer.manager.store import Store
from xfer.manager.store import get as bundles
from xfer.model import Kind
from xfer.net.message import Message, parse

ALL = (Kind.CONNTRACK, Kind.DHCP, Kind.COUNTERS)


def out(mode: str | None = None, kinds: tuple[str, ...] | None = None, dst: str = "hv2") -> Message:
    return Message("vm1", "not-running", "out", "hv1", dst, kinds, mode)


def into(mode: str | None = None) -> Message:
    return Message("vm1", "starting", "in", "hv1", "hv2", None, mode)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[FakeDevices, Journal, Store, Path]]:
    devices = FakeDevices()
    devices.put("fw-a", ALL)
    db = tmp_path / "m.db"
    journal, store = SqliteJournal(db), SqliteStore(db, ttl_s=60)
    yield devices, journal, store, db
    asyncio.run(journal.close())
    asyncio.run(store.close())


def migrator(env: tuple[FakeDevices, Journal, Store, Path], **settings: object) -> Migrator:
    devices, journal, store, _ = env
    return Migrator(topo(), devices, journal, store, Settings(**settings))  # type: ignore[arg-type]


async def run(m: Migrator, *msgs: Message) -> dict[str, object]:
    report: dict[str, object] = {}
    for msg in msgs:
        report = await m.handle(msg)
    await m.wait_background()
    return report


@pytest.mark.parametrize("mode", ["relay", "push", "pull", "store"])
def test_every_mode_moves_each_kind_to_its_holder_and_cleans_the_source_after(env, mode: str) -> None:
    devices, journal, *_ = env
    m = migrator(env)
    msgs = (out(mode), into(mode)) if mode == "store" else (out(mode),)
    report = asyncio.run(run(m, *msgs))
    assert report["state"] == "committed" and report["mode"] == mode
    assert devices.has("fw-b", Kind.CONNTRACK) and devices.has("fw-b", Kind.COUNTERS)
    assert devices.has("sw-b", Kind.DHCP) and not devices.has("sw-b", Kind.CONNTRACK)
    assert not any(devices.has("fw-a", k) for k in ALL), "source not cleaned"
    # Cleanup came after the last import (journal order), and the journal closed the migration.
    rec = asyncio.run(journal.recent(1))[0]
    names = [p.name for p in rec.phases if p.name != "pause"]   # "pause": a record, no device step
    assert names[-1] == "cleanup" and "cleanup" not in names[:-1]
    assert rec.outcome == "cleaned" and all(p.outcome == "ok" for p in rec.phases)
    assert rec.to_dict()["phases"][0]["ms"] is not None


def test_age_out_leaves_the_source_alone(env) -> None:
    devices, journal, *_ = env
    report = asyncio.run(run(migrator(env, cleanup="age-out"), out()))
    assert report["cleanup"] == "age-out"
    assert devices.has("fw-a", Kind.CONNTRACK) and devices.has("fw-b", Kind.CONNTRACK)
    assert asyncio.run(journal.recent(1))[0].outcome == "committed"


def test_failing_destination_rolls_back_every_destination_and_keeps_the_source(env) -> None:
    devices, journal, *_ = env
    devices.fail.add(URL["sw-b"])
    with pytest.raises(MigrationFailed, match="sw-b"):
        asyncio.run(run(migrator(env), out("relay")))
    assert not devices.has("fw-b", Kind.CONNTRACK), "the committed destination was not rolled back"
    assert all(devices.has("fw-a", k) for k in ALL), "the source lost state"
    assert ("forget", URL["fw-a"]) not in [(n, u) for n, u, _ in devices.calls]
    assert asyncio.run(journal.recent(1))[0].outcome == "rolled-back"


@pytest.mark.parametrize("grace", [30.0, 0.05], ids=["requests-finish-then-rollback", "grace-expired"])
def test_abort_under_way_rolls_back(env, grace: float) -> None:
    devices, journal, *_ = env
    devices.hang.add(URL["sw-b"])
    m = migrator(env)
    m.abort_grace_s = grace

    async def scenario() -> dict[str, object]:
        task = asyncio.ensure_future(m.handle(out("push")))
        await devices.hanging.wait()
        aborting = asyncio.ensure_future(m.handle(parse({"vm": "vm1", "indication": "abort"})))
        await asyncio.sleep(0.1)
        devices.release.set()   # the switch answers (after the grace when it is short)
        answer = await aborting
        with pytest.raises(MigrationFailed, match="aborted"):
            await task
        return answer

    answer = asyncio.run(scenario())
    assert answer["aborted"] and answer["was"] == "under way"
    assert not devices.has("fw-b", Kind.CONNTRACK) and all(devices.has("fw-a", k) for k in ALL)
    rec = asyncio.run(journal.recent(1))[0]
    assert rec.outcome == "aborted" and [p.name for p in rec.phases].count("rollback") == 2
    if grace > 1:
        # The hung import finished before the rollback: the rollback came last at the switch.
        assert devices.calls[-1][:2] in {("forget", URL["sw-b"]), ("forget", URL["fw-b"])}
        assert not devices.has("sw-b", Kind.DHCP)


def test_abort_between_store_out_and_in_drops_the_deposit(env) -> None:
    devices, journal, store, _ = env
    m = migrator(env)
    asyncio.run(run(m, out("store")))
    mid = asyncio.run(journal.recent(1))[0].id
    assert asyncio.run(bundles(store, mid))
    assert asyncio.run(m.handle(parse({"vm": "vm1", "indication": "abort"})))["was"] == "stored"
    assert asyncio.run(bundles(store, mid)) == {} and all(devices.has("fw-a", k) for k in ALL)
    with pytest.raises(UsageError, match="no stored bundles"):
        asyncio.run(run(m, into("store")))


def test_explicit_kind_without_holder_is_refused_before_anything_moves(env) -> None:
    devices, *_ = env
    with pytest.raises(UsageError, match="no device on hv3's uplink path holds dhcp"):
        asyncio.run(run(migrator(env), out(kinds=("conntrack", "dhcp"), dst="hv3")))
    assert devices.calls == []


def test_default_kinds_report_what_cannot_move(env) -> None:
    report = asyncio.run(run(migrator(env), out(dst="hv3")))
    assert set(report["missing"]) == {"dhcp", "counters"}  # type: ignore[arg-type]


def test_unknown_vm_and_server(env) -> None:
    m = migrator(env)
    with pytest.raises(UsageError, match="unknown VM 'ghost'"):
        asyncio.run(m.handle(Message("ghost", "not-running", "out", "hv1", "hv2")))
    with pytest.raises(UsageError, match="unknown server 'hv9'"):
        asyncio.run(m.handle(out(dst="hv9")))


def test_in_is_a_no_op_outside_store_mode(env) -> None:
    devices, *_ = env
    answer = asyncio.run(run(migrator(env), into("relay")))
    assert answer["ok"] and devices.calls == []


def test_restart_rolls_back_a_transfer_under_way_and_finishes_a_pending_cleanup(env) -> None:
    devices, journal, _store, _db = env
    t = topo()
    plan = {"routes": [{"kind": "conntrack", "source": "fw-a", "destinations": ["fw-b"]}]}
    ident = t.vm("vm1").to_dict()
    # 1: the manager died mid-transfer: fw-b got conntrack, nothing was committed.
    under_way = asyncio.run(journal.begin("vm1", ident, "hv1", "hv2", "relay", plan, 300))
    devices.put("fw-b", [Kind.CONNTRACK])
    async def recover_all(m: Migrator) -> list[dict[str, object]]:
        done = await m.recover()
        await settle(m.outcomes)
        await m.wait_background()
        return done

    recovered = asyncio.run(recover_all(migrator(env)))
    assert recovered[0]["action"] == "rolling back"
    assert not devices.has("fw-b", Kind.CONNTRACK) and devices.has("fw-a", Kind.CONNTRACK)
    assert asyncio.run(journal.get(under_way)).outcome == "rolled-back"
    # 2: it died after the commit, before the cleanup: the restart cleans the source.
    committed = asyncio.run(journal.begin("vm1", ident, "hv1", "hv2", "relay", plan, 300))
    devices.put("fw-b", [Kind.CONNTRACK])
    asyncio.run(journal.state(committed, "committed"))
    assert asyncio.run(recover_all(migrator(env)))[0]["action"] == "finishing cleanup"
    assert devices.has("fw-b", Kind.CONNTRACK) and not devices.has("fw-a", Kind.CONNTRACK)
    assert asyncio.run(journal.get(committed)).outcome == "cleaned"
    assert asyncio.run(journal.unfinished()) == []


def test_message_parsing_refuses_bad_input() -> None:
    good = {"vm": "vm1", "indication": "not-running", "direction": "out", "source": "a", "destination": "b"}
    assert parse(good).mode is None
    for bad, why in [({**good, "indication": "paused"}, "indication"), ({**good, "mode": "x"}, "mode"),
                     ({**good, "destination": "", "mode": "push"}, "only deposit into the store"),
                     ({**good, "source": ""}, "must name its source"),
                     ({**good, "direction": "in", "destination": ""}, "must name its destination"),
                     ({**good, "kinds": ["nope"]}, "nope"), ({**good, "id": "a b"}, "id must be"),
                     ({**good, "vm": ""}, "no vm"), ([], "JSON object")]:
        with pytest.raises(UsageError, match=why):
            parse(bad)
    # A libvirt source does not know the destination; the destination's "in" may not know the source.
    assert parse({**good, "destination": ""}).destination == ""
    assert parse({**good, "direction": "in", "source": ""}).source == ""


def test_budget_overrun_is_reported(env) -> None:
    report = asyncio.run(run(migrator(env, budget_ms=0.0001), out()))
    assert report["over_budget"] is True and set(report["device_ms"]) >= {"fw-a", "fw-b", "sw-b"}  # type: ignore[arg-type]


def test_abort_during_cleanup_is_refused_and_after_age_out_commit_rolls_back(env) -> None:
    devices, journal, *_ = env
    m = migrator(env)

    async def during_cleanup() -> None:
        await m.handle(out())
        # The cleanup task has started (it runs after the answer): too late to roll back.
        await asyncio.sleep(0)
        with pytest.raises(UsageError, match="too late"):
            await m.abort("vm1")
        await m.wait_background()

    asyncio.run(during_cleanup())
    assert devices.has("fw-b", Kind.CONNTRACK)
    devices.put("fw-a", ALL)
    aged = migrator(env, cleanup="age-out")
    asyncio.run(run(aged, out()))
    # With age-out the source kept everything: a late abort (the hook gave up) rolls back.
    assert asyncio.run(aged.abort("vm1"))["was"] == "committed"
    assert not devices.has("fw-b", Kind.CONNTRACK) and all(devices.has("fw-a", k) for k in ALL)
    assert asyncio.run(journal.recent(1))[0].outcome == "aborted"
    with pytest.raises(UsageError, match="no migration of VM vm1 to abort"):
        asyncio.run(aged.abort("vm1"))


def test_the_report_names_other_source_holders_that_were_not_moved(env) -> None:
    devices, journal, store, _ = env
    raw = json.loads(json.dumps(TOPOLOGY))
    raw["devices"]["rt-a"] = {"type": "router", "kinds": ["conntrack"], "agent": "https://10.0.4.9:7443"}
    m = Migrator(topology.parse(raw), devices, journal, store, Settings())
    report = asyncio.run(run(m, out("relay")))
    assert report["also_held_by"] == {"conntrack": ["rt-a"]}
    # Only the nearest holder gave and was cleaned; the router was not touched.
    assert not [c for c in devices.calls if c[1] == "https://10.0.4.9:7443"]
    assert asyncio.run(journal.recent(1))[0].plan["routes"][0]["also_held_by"] == ["rt-a"]


def test_an_out_without_destination_is_stored_and_the_destinations_in_completes_it(env) -> None:
    """libvirt: the source does not know where the VM goes; the destination's "in" names itself."""
    devices, journal, *_ = env
    m = migrator(env)           # default mode relay: without a destination only the store can take it
    stored = asyncio.run(run(m, Message("vm1", "not-running", "out", "hv1", "", None, None)))
    assert stored["state"] == "stored" and stored["destination"] == ""
    assert devices.ops("import") == []
    assert asyncio.run(journal.get(stored["migration"])).plan["routes"][0]["destinations"] == []
    with pytest.raises(UsageError, match="came from hv1, not hv3"):
        asyncio.run(run(m, Message("vm1", "starting", "in", "hv3", "hv2")))
    report = asyncio.run(run(m, Message("vm1", "starting", "in", "", "hv2")))
    assert report["state"] == "committed" and report["destination"] == "hv2"
    assert devices.has("fw-b", Kind.CONNTRACK) and devices.has("sw-b", Kind.DHCP)
    assert not devices.has("fw-a", Kind.CONNTRACK), "not cleaned after commit"
    assert asyncio.run(journal.get(stored["migration"])).destination == "hv2"


def test_an_in_for_another_destination_than_announced_is_refused(env) -> None:
    devices, *_ = env
    m = migrator(env)
    asyncio.run(run(m, out("store")))
    with pytest.raises(UsageError, match="announced to hv2, not hv3"):
        asyncio.run(run(m, Message("vm1", "starting", "in", "hv1", "hv3")))
    assert devices.ops("import") == []
