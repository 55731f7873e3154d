"""The device-driven variant without root: the real manager server on 127.0.0.1, agents'
device-driven logic (real AgentService over fake transfers) talking to it over mutual TLS.

The manager "hears" a multicast datagram through ``ManagerServer.handle(body, "multicast")``
(what its group listener calls); each agent's ``DeviceDriven.act`` is what its own group
listener runs. The manager's own device requests (cleanup, rollback) go to FakeDevices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.agent_fakes import FakeTransfer
from tests.agent_fakes import config as agent_config
from tests.manager_fakes import TOPOLOGY, URL, FakeDevices
from xfer import pki
from xfer.agent.client import AgentClient
from xfer.agent.devicedriven import DeviceDriven, wanted
from xfer.agent.service import AgentService
from xfer.agent.upstream import Upstream
from xfer.errors import AgentError, AuthError, StoreExpired, UsageError
from xfer.manager.config import ManagerConfig
from xfer.manager.migration import MigrationFailed, Settings
from xfer.manager.server import ManagerServer
from xfer.model import Kind
from xfer.net import tls
from xfer.net.tls import TlsFiles

ALL = (Kind.CONNTRACK, Kind.DHCP, Kind.COUNTERS)
KINDS = {"fw-a": ALL, "fw-b": (Kind.CONNTRACK, Kind.COUNTERS), "sw-b": (Kind.DHCP,)}
OUT = {"vm": "vm1", "indication": "not-running", "direction": "out", "source": "hv1",
       "destination": "hv2", "mode": "store"}
IN = {**OUT, "indication": "starting", "direction": "in"}


@dataclasses.dataclass
class Lab:
    server: ManagerServer
    devices: FakeDevices                        # what the manager itself asks of agents
    agents: dict[str, DeviceDriven]
    fakes: dict[str, FakeTransfer]              # each agent's kernel
    clients: dict[str, AgentClient]

    def heard(self, body: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """The manager hears ``body`` on the multicast group."""
        return asyncio.ensure_future(self.server.handle(body, "multicast"))

    async def act(self, body: dict[str, Any], *names: str) -> dict[str, dict[str, Any]]:
        """The agents (default: all) hear ``body`` on the group and act."""
        names = names or tuple(self.agents)
        done = await asyncio.gather(*(self.agents[n].act(body) for n in names))
        return dict(zip(names, done, strict=True))

    async def stored(self) -> int:
        """"out" heard by all: the source deposits; the migration's id."""
        heard = self.heard(OUT)
        await self.act(OUT)
        return int((await heard)["migration"])


@asynccontextmanager
async def lab(tmp_path: Path, **settings: Any) -> AsyncIterator[Lab]:
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "manager", ips=["127.0.0.1"])
    for name in KINDS:
        pki.issue(d, name)
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(TOPOLOGY))))
    ttl = settings.pop("store_ttl_s", 60.0)
    cfg = ManagerConfig(topology=tmp_path / "topology.yaml",
                        tls=TlsFiles(d / "manager.pem", d / "manager.key", d / "ca.pem"),
                        journal=tmp_path / "m.db", port=0, store_ttl_s=ttl,
                        settings=Settings(mode="relay", **settings))
    devices = FakeDevices()
    devices.put("fw-a", ALL)
    async with ManagerServer(cfg, devices) as server:
        base = server.url.removesuffix("/v1/migrations")
        agents, fakes, clients = {}, {}, {}
        for name, kinds in KINDS.items():
            acfg = dataclasses.replace(agent_config(tmp_path / name, kinds, counter_interfaces=("vm0",)),
                                       device_id=name)
            ctx = tls.client_context(d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")
            clients[name] = AgentClient(ctx, timeout=10)
            fakes[name] = FakeTransfer()
            agents[name] = DeviceDriven(AgentService(acfg, transfer=fakes[name]),
                                        Upstream(clients[name], base, name), lambda _r: None)
        try:
            yield Lab(server, devices, agents, fakes, clients)
        finally:
            for c in clients.values():
                await c.close()


def run(tmp_path: Path, scenario: Callable[[Lab], Awaitable[None]], **settings: Any) -> None:
    async def main() -> None:
        async with lab(tmp_path, **settings) as env:
            await scenario(env)

    asyncio.run(main())


def test_out_then_in_on_the_group_the_devices_deposit_and_collect_themselves(tmp_path: Path) -> None:
    async def scenario(env: Lab) -> None:
        heard = env.heard(OUT)
        acted = await env.act(OUT)
        out = await heard
        assert out["state"] == "stored" and out["driven_by"] == "devices" and out["stored"]["fw-a"] > 0
        assert acted["fw-a"]["role"] == "source" and acted["fw-a"]["outcome"] == "ok"
        assert not acted["fw-b"]["acted"] and not acted["sw-b"]["acted"]
        assert env.fakes["fw-a"].exported and env.devices.calls == [], "the manager drove a device"
        mid = out["migration"]
        # A repeated datagram: the manager answers the same migration, the source does nothing more.
        again = await env.server.handle(OUT, "multicast")
        assert again["duplicate"] and again["migration"] == mid and again["state"] == "stored"
        assert not (await env.act(OUT, "fw-a"))["fw-a"]["acted"]
        assert len(env.fakes["fw-a"].exported) == 1

        heard = env.heard(IN)
        acted = await env.act(IN)
        report = await heard
        assert report["state"] == "committed" and report["migration"] == mid
        assert acted["fw-b"]["role"] == acted["sw-b"]["role"] == "destination"
        assert sorted(env.fakes["fw-b"].imported) == sorted([Kind.CONNTRACK, Kind.COUNTERS])
        assert env.fakes["sw-b"].imported == [Kind.DHCP] and env.fakes["fw-a"].imported == []
        await env.server.migrator.wait_background()
        # The source is cleaned by the manager, only after both destinations reported their import.
        assert env.devices.ops("forget") == [(URL["fw-a"], ALL)]
        rec = env.server.migrator.journal.get(mid)
        assert rec.outcome == "cleaned"
        collects = [p for p in rec.phases if p.name == "collect"]
        cleanup = [p for p in rec.phases if p.name == "cleanup"]
        assert {p.device for p in collects} == {"fw-b", "sw-b"} and all(p.outcome == "ok" for p in collects)
        assert cleanup[0].started >= max(p.ended or 0 for p in collects)
        # A repeated "in": same answer, nothing imported again, nothing cleaned again.
        again = await env.server.handle(IN, "multicast")
        assert again["duplicate"] and again["state"] == "committed"
        assert not any(a["acted"] for a in (await env.act(IN)).values())
        assert len(env.fakes["fw-b"].imported) == 2 and len(env.devices.calls) == 1

    run(tmp_path, scenario)


def test_agents_first_and_in_before_the_deposit_is_complete(tmp_path: Path) -> None:
    """Order does not matter: an agent's role request may start the migration before the manager
    hears the datagram, and "in" may come while the source is still depositing."""
    async def scenario(env: Lab) -> None:
        gate = asyncio.Event()
        real = env.agents["fw-a"].upstream.deposit

        async def slow_deposit(mid: int, data: bytes) -> dict[str, Any]:
            await gate.wait()
            return await real(mid, data)

        env.agents["fw-a"].upstream.deposit = slow_deposit  # type: ignore[method-assign]
        source = asyncio.ensure_future(env.act(OUT, "fw-a"))
        await asyncio.sleep(0.2)
        out = env.heard(OUT)                     # the manager hears it after the agent
        into = env.heard(IN)
        dests = asyncio.ensure_future(env.act(IN, "fw-b", "sw-b"))
        await asyncio.sleep(0.2)
        assert not into.done() and env.fakes["fw-b"].imported == []
        gate.set()
        assert (await out)["duplicate"], "the manager's own hearing did not join the agent's"
        assert (await into)["state"] == "committed"
        await source
        assert all(a["outcome"] == "ok" for a in (await dests).values())
        assert len(env.server.migrator.journal.recent(10)) == 1

    run(tmp_path, scenario)


def test_a_failing_destination_rolls_back_and_the_source_is_kept(tmp_path: Path) -> None:
    async def scenario(env: Lab) -> None:
        env.fakes["sw-b"].fail.add(Kind.DHCP)
        mid = await env.stored()
        into = env.heard(IN)
        await env.act(IN)
        with pytest.raises(MigrationFailed, match="sw-b"):
            await into
        await env.server.migrator.wait_background()
        # Rolled back at both destinations by the manager; the source never asked to forget.
        assert {u for u, _ in env.devices.ops("forget")} == {URL["fw-b"], URL["sw-b"]}
        assert env.server.migrator.journal.get(mid).outcome == "rolled-back"

    run(tmp_path, scenario)


def test_a_device_that_does_not_act_fails_the_migration_in_time(tmp_path: Path) -> None:
    async def scenario(env: Lab) -> None:
        started = time.monotonic()
        with pytest.raises(MigrationFailed, match=r"fw-a did not deposit its bundle within 0\.3 s"):
            await env.server.handle(OUT, "multicast")
        assert time.monotonic() - started < 2
        rec = env.server.migrator.journal.recent(1)[0]
        assert rec.outcome == "failed" and env.server.migrator.store.devices(rec.id) == set()

    run(tmp_path, scenario, device_timeout_s=0.3)


def test_an_import_the_manager_gave_up_on_is_undone_by_the_agent(tmp_path: Path) -> None:
    async def scenario(env: Lab) -> None:
        await env.stored()
        # The switch's import takes longer than the manager waits: rollback first, import after.
        env.fakes["sw-b"].on_import = lambda kind: time.sleep(0.8)
        into = env.heard(IN)
        acted = await env.act(IN)
        with pytest.raises(MigrationFailed, match=r"sw-b did not import fw-a's bundle within 0\.5 s"):
            await into
        assert "undone" in acted["sw-b"]["result"]["fw-a"]
        assert env.fakes["sw-b"].forgotten and env.fakes["sw-b"].forgotten[-1][1] == (Kind.DHCP,)

    run(tmp_path, scenario, device_timeout_s=0.5)


def test_an_expired_stored_bundle_is_a_clear_error_and_nothing_is_imported(tmp_path: Path) -> None:
    async def scenario(env: Lab) -> None:
        mid = await env.stored()
        await asyncio.sleep(0.4)
        into = env.heard(IN)
        acted = await env.act(IN)
        with pytest.raises(StoreExpired, match="the stored bundles of VM vm1 expired"):
            await into
        assert "expired" in acted["fw-b"]["error"] and not acted["fw-b"]["acted"]
        assert env.fakes["fw-b"].imported == [] and env.fakes["sw-b"].imported == []
        assert env.server.migrator.journal.get(mid).outcome == "failed"
        assert env.devices.calls == [], "the source was touched"

    run(tmp_path, scenario, store_ttl_s=0.3)


def test_abort_stops_waiting_for_the_devices_at_once(tmp_path: Path) -> None:
    async def scenario(env: Lab) -> None:
        abort = {"vm": "vm1", "indication": "abort"}
        # While waiting for the deposit (the source never acts): nothing stored, source untouched.
        out = env.heard({**OUT, "id": "first"})   # its own id: the "out" below is a new message
        await asyncio.sleep(0.1)
        started = time.monotonic()
        assert (await env.server.handle(abort, "http"))["aborted"] and time.monotonic() - started < 2
        with pytest.raises(MigrationFailed, match="was aborted; nothing stored"):
            await out
        first = env.server.migrator.journal.recent(1)[0]
        assert first.outcome == "aborted" and env.server.migrator.store.devices(first.id) == set()
        # While waiting for the destinations' imports: every destination rolled back.
        mid = await env.stored()
        into = env.heard(IN)                     # the destinations never act
        await asyncio.sleep(0.1)
        started = time.monotonic()
        answer = await env.server.handle(abort, "http")
        assert answer["aborted"] and time.monotonic() - started < 2
        with pytest.raises(MigrationFailed, match="aborted"):
            await into
        assert env.server.migrator.journal.get(mid).outcome == "aborted"
        assert {u for u, _ in env.devices.ops("forget")} == {URL["fw-b"], URL["sw-b"]}

    run(tmp_path, scenario)


def test_a_source_without_destination_is_completed_by_the_destinations_in(tmp_path: Path) -> None:
    """libvirt: the source's "out" names no destination (store semantics whatever the default
    mode); the destination's "in" names itself and may not know the source."""
    async def scenario(env: Lab) -> None:
        heard = env.heard({**OUT, "destination": "", "mode": None})
        acted = await env.act({**OUT, "destination": "", "mode": None})
        out = await heard
        assert out["state"] == "stored" and out["destination"] == "" and acted["fw-a"]["outcome"] == "ok"
        assert env.fakes["fw-a"].exported[0][1] == ALL
        wrong = {**IN, "source": "", "destination": "hv1", "mode": None}
        with pytest.raises(UsageError, match="same server"):
            await env.server.handle(wrong, "http")
        into = env.heard({**IN, "source": "", "mode": None})
        await env.act({**IN, "source": "", "mode": None})
        report = await into
        assert report["state"] == "committed" and report["destination"] == "hv2"
        assert env.fakes["sw-b"].imported == [Kind.DHCP]
        rec = env.server.migrator.journal.get(out["migration"])
        assert rec.destination == "hv2" and rec.plan["routes"][0]["destinations"] == ["fw-b"]

    run(tmp_path, scenario)


def test_devices_act_only_for_themselves_and_only_when_awaited(tmp_path: Path) -> None:
    async def scenario(env: Lab) -> None:
        impostor = Upstream(env.clients["fw-b"], env.agents["fw-a"].upstream.url, "fw-a")
        with pytest.raises(AuthError, match="peer fw-b may not act for device fw-a"):
            await impostor.role(OUT)
        with pytest.raises(AgentError, match="no migration 42") as info:
            await env.agents["fw-a"].upstream.deposit(42, b"x")
        assert info.value.status == 409
        mid = await env.stored()
        # Nobody collects between "out" and "in", and a deposit after the round is refused.
        with pytest.raises(AgentError, match="not waiting") as info:
            await env.agents["fw-b"].upstream.collect(mid, "fw-a")
        assert info.value.status == 409
        with pytest.raises(AgentError, match="not waiting"):
            await env.agents["fw-a"].upstream.deposit(mid, b"x")
        # Aborts and other modes on the group are not the agents' business.
        assert wanted(OUT) and wanted({**OUT, "mode": None})
        assert not wanted({**OUT, "mode": "push"}) and not wanted({"vm": "vm1", "indication": "abort"})

    run(tmp_path, scenario)
