"""The agent's rules, with a fake transfer API: validation before the kernel, the journal,
undo of a half-refused multi-kind import, push/pull that never delete at the source."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.agent_fakes import OTHER_VM, VM, FakePeers, FakeTransfer, bundle_bytes, config
from xfer import bundle as bundle_mod
from xfer.agent.journal import Journal
from xfer.agent.protocol import MIGRATION
from xfer.agent.service import AgentService, Trace
from xfer.errors import AuthError, BundleError, ForeignEntryError, MigrationCancelled, UsageError
from xfer.model import Kind

KEY = b"k" * 32
BOTH = (Kind.CONNTRACK, Kind.COUNTERS)


def _service(tmp_path: Path, kinds=(Kind.CONNTRACK,), key=None, **cfg):  # type: ignore[no-untyped-def]
    fake = FakeTransfer()
    svc = AgentService(config(tmp_path, kinds, **cfg), transfer=fake, peers=FakePeers(), key=key)
    return svc, fake


def _import(svc: AgentService, data: bytes, vm=VM, kinds=None):  # type: ignore[no-untyped-def]
    return asyncio.run(svc.import_(data, vm, kinds, Trace()))


def test_export_signs_and_refuses_kinds_not_held(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path, key=KEY)
    trace = Trace()
    _, data = asyncio.run(svc.export(VM, [Kind.CONNTRACK], trace))
    assert bundle_mod.decode(data, KEY).vm == VM
    assert trace.entries == {"conntrack": 3} and {"export", "encode"} <= set(trace.phases)
    with pytest.raises(UsageError, match="does not hold dhcp"):
        asyncio.run(svc.export(VM, [Kind.DHCP], Trace()))
    assert len(fake.exported) == 1


@pytest.mark.parametrize(("data", "vm", "kinds", "error", "message"), [
    (bundle_bytes(OTHER_VM), VM, None, ForeignEntryError, "not of the VM named in the request"),
    (bundle_bytes(kinds=BOTH), VM, None, UsageError, "does not hold counters"),
    (bundle_bytes(), VM, [Kind.COUNTERS], UsageError, "does not hold counters"),
    (bundle_bytes()[:-2], VM, None, BundleError, "truncated"),
    (b"x" * 5000, VM, None, BundleError, "over this device's limit"),
])
def test_refused_imports_touch_nothing(tmp_path: Path, data: bytes, vm, kinds, error, message) -> None:  # type: ignore[no-untyped-def]
    svc, fake = _service(tmp_path, max_bundle_bytes=4096)
    with pytest.raises(error, match=message):
        _import(svc, data, vm, kinds)
    assert fake.imported == [] and fake.forgotten == []
    assert not Journal(svc.config.state_dir).unfinished()


def test_requested_kind_missing_from_bundle(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path, kinds=BOTH, counter_interfaces=("vm0",))
    with pytest.raises(BundleError, match="no counters section"):
        _import(svc, bundle_bytes(), VM, list(BOTH))
    assert fake.imported == []


def test_signature_required_when_keyed(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path, key=KEY)
    with pytest.raises(AuthError):
        _import(svc, bundle_bytes())
    with pytest.raises(AuthError):
        _import(svc, bundle_bytes(key=b"z" * 32))
    assert _import(svc, bundle_bytes(key=KEY)).ok
    assert fake.imported == [Kind.CONNTRACK]


def test_journal_marker_held_during_import_only(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path)
    seen = []
    fake.on_import = lambda kind: seen.append(len(Journal(svc.config.state_dir).unfinished()))
    report = _import(svc, bundle_bytes())
    assert report.ok and seen == [1]
    assert not Journal(svc.config.state_dir).unfinished()


def test_later_kind_refused_undoes_the_committed_ones(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path, kinds=BOTH)
    fake.refuse[Kind.COUNTERS] = ForeignEntryError("counters entry of another VM")
    with pytest.raises(ForeignEntryError):
        _import(svc, bundle_bytes(kinds=BOTH))
    assert fake.imported == [Kind.CONNTRACK]
    assert fake.forgotten == [(VM, (Kind.CONNTRACK,))]
    assert not Journal(svc.config.state_dir).unfinished()


def test_counters_are_imported_into_the_first_counting_interface(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path, kinds=BOTH, counter_interfaces=("vm0", "vm1"))
    assert _import(svc, bundle_bytes(kinds=BOTH)).ok
    assert fake.options[-1] == {Kind.COUNTERS: {"dev": "vm0"}}


def test_failed_kind_is_reported_and_the_others_kept(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path, kinds=BOTH)
    fake.fail.add(Kind.CONNTRACK)
    report = _import(svc, bundle_bytes(kinds=BOTH))
    assert not report.ok and set(report.errors) == {Kind.CONNTRACK}
    assert report.kinds[Kind.COUNTERS].created == 3
    assert fake.forgotten == []  # each kind is all-or-nothing on its own


def test_recover_rolls_back_unfinished_imports(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path)
    Journal(svc.config.state_dir).begin("b1", VM, [Kind.CONNTRACK, Kind.DHCP], "ns1")
    done = svc.recover()
    # DHCP is not held here: only conntrack is rolled back.
    assert fake.forgotten == [(VM, (Kind.CONNTRACK,))]
    assert done[0]["bundle"] == "b1" and done[0]["deleted"] == {"conntrack": 1}
    assert not Journal(svc.config.state_dir).unfinished()
    assert svc.recover() == []


def test_unreadable_marker_stops_recovery(tmp_path: Path) -> None:
    svc, _ = _service(tmp_path)
    svc.config.state_dir.mkdir(parents=True)
    (svc.config.state_dir / "import-x.json").write_text("{")
    with pytest.raises(Exception, match="unreadable"):
        svc.recover()


def test_push_sends_and_never_deletes(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path)
    result = asyncio.run(svc.push(VM, [Kind.CONNTRACK], "https://10.0.4.2:7443/", Trace()))
    peers = svc.peers
    assert isinstance(peers, FakePeers)
    assert peers.sent and peers.sent[0][0] == "https://10.0.4.2:7443"
    assert bundle_mod.decode(peers.sent[0][1]).vm == VM
    assert result["ok"] and result["exported"] == {"conntrack": 3}
    assert fake.forgotten == []


@pytest.mark.parametrize("url", ["http://10.0.4.2:7443", "10.0.4.2:7443", "https:///x", ""])
def test_push_and_pull_refuse_bad_urls_first(tmp_path: Path, url: str) -> None:
    svc, fake = _service(tmp_path)
    with pytest.raises(UsageError, match="URL"):
        asyncio.run(svc.push(VM, [Kind.CONNTRACK], url, Trace()))
    with pytest.raises(UsageError, match="URL"):
        asyncio.run(svc.pull(VM, [Kind.CONNTRACK], url, Trace()))
    assert fake.exported == [] and fake.imported == []


def test_pull_fetches_then_imports_with_the_same_checks(tmp_path: Path) -> None:
    svc, fake = _service(tmp_path)
    trace = Trace()
    report = asyncio.run(svc.pull(VM, [Kind.CONNTRACK], "https://10.0.4.1:7443", trace))
    assert report.ok and fake.imported == [Kind.CONNTRACK]
    assert {"fetch", "decode", "import"} <= set(trace.phases)
    with pytest.raises(UsageError, match="does not hold dhcp"):
        asyncio.run(svc.pull(VM, [Kind.DHCP], "https://10.0.4.1:7443", Trace()))


def test_capabilities(tmp_path: Path) -> None:
    svc, _ = _service(tmp_path)
    caps = svc.capabilities()
    assert caps["device"] == "dev" and caps["kinds"] == ["conntrack"]
    assert caps["operations"] == ["export", "import", "forget", "push", "pull", "precopy"]


def test_after_a_migrations_state_is_forgotten_its_late_imports_are_refused(tmp_path: Path) -> None:
    """A rollback reaches work still on its way: the forget of migration m7 refuses m7's imports
    queued or sent after it, and no other migration's."""
    svc, fake = _service(tmp_path)

    async def scenario() -> None:
        MIGRATION.set("j1-7")
        # An import of m7 under way when the forget comes finishes first; the forget then undoes it.
        fake.on_import = lambda kind: time.sleep(0.2)
        under_way = asyncio.ensure_future(svc.import_(bundle_bytes(), VM, None, Trace()))
        await asyncio.sleep(0.05)
        await svc.forget(VM, [Kind.CONNTRACK], Trace())
        assert (await under_way).kinds and fake.imported == [Kind.CONNTRACK]
        fake.on_import = None
        with pytest.raises(MigrationCancelled, match="migration j1-7 was rolled back on device dev"):
            await svc.import_(bundle_bytes(), VM, None, Trace())
        with pytest.raises(MigrationCancelled):
            await svc.pull(VM, [Kind.CONNTRACK], "https://10.0.4.1:7443", Trace())
        MIGRATION.set("j1-8")
        await svc.import_(bundle_bytes(), VM, None, Trace())

    asyncio.run(scenario())
    assert fake.imported == [Kind.CONNTRACK, Kind.CONNTRACK]
    assert len(fake.forgotten) == 1

