"""The manager daemon on 127.0.0.1 with fake agents: the hook's client, mutual TLS, UDP, abort,
metrics, journal listing (no root)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.manager_fakes import TOPOLOGY, FakeDevices
from xfer import pki
from xfer.errors import MigrationMessageError
from xfer.hypervisor import hook
from xfer.manager.config import ManagerConfig
from xfer.manager.server import ManagerServer
from xfer.model import Kind
from xfer.net import notify as client
from xfer.net import tls
from xfer.net.message import MigrationMessage
from xfer.net.notify import send_migration_message
from xfer.net.tls import TlsFiles

ALL = (Kind.CONNTRACK, Kind.DHCP, Kind.COUNTERS)


def _setup(tmp_path: Path) -> tuple[ManagerConfig, Any]:
    pki.init_ca(tmp_path / "pki")
    pki.issue(tmp_path / "pki", "manager", ips=["127.0.0.1"])
    pki.issue(tmp_path / "pki", "hv1")
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(TOPOLOGY))))
    p = tmp_path / "pki"
    cfg = ManagerConfig(topology=tmp_path / "topology.yaml",
                        tls=TlsFiles(p / "manager.pem", p / "manager.key", p / "ca.pem"),
                        journal=tmp_path / "m.db", port=0, udp=("127.0.0.1", 0))
    return cfg, tls.client_context(p / "ca.pem", p / "hv1.pem", p / "hv1.key")


def msg(direction: str = "out", mode: str | None = None, indication: str = "not-running",
        ident: str | None = None) -> MigrationMessage:
    return MigrationMessage("vm1", indication, direction, "hv1", "hv2", None, mode, ident)


def test_the_hooks_client_moves_state_and_the_journal_lists_it(tmp_path: Path) -> None:
    cfg, ctx = _setup(tmp_path)
    devices = FakeDevices()
    devices.put("fw-a", ALL)

    async def scenario() -> None:
        async with ManagerServer(cfg, devices) as server:
            report = await send_migration_message(server.url, msg(mode="pull"), time.monotonic() + 5, ctx)
            assert report["state"] == "committed" and report["mode"] == "pull"
            # The stand-in's URL shape (/migrations) works too, and "in" is a no-op outside store mode.
            legacy = server.url.replace("/v1/migrations", "/migrations")
            answer = await send_migration_message(legacy, msg("in", indication="starting"),
                                                  time.monotonic() + 5, ctx)
            assert answer["ok"] and "needs no action" in answer["note"]
            await server.migrator.wait_background()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
                async with s.get(server.url) as r:
                    listed = await r.json()
                async with s.get(server.url.replace("/v1/migrations", "/metrics")) as r:
                    metrics = await r.text()
            assert listed[0]["outcome"] == "cleaned" and listed[0]["phases"][0]["name"] == "pull"
            assert 'xfer_manager_messages_total{outcome="ok",transport="http"} 2.0' in metrics

    asyncio.run(scenario())
    assert devices.has("sw-b", Kind.DHCP) and not devices.has("fw-a", Kind.CONNTRACK)


def test_clients_without_a_certificate_are_refused(tmp_path: Path) -> None:
    cfg, _ = _setup(tmp_path)
    devices = FakeDevices()
    devices.put("fw-a", ALL)
    no_cert = tls.client_context(tmp_path / "pki/ca.pem")

    async def scenario() -> None:
        async with ManagerServer(cfg, devices) as server:
            with pytest.raises(MigrationMessageError):
                await send_migration_message(server.url, msg(), time.monotonic() + 5, no_cert)

    asyncio.run(scenario())
    assert devices.calls == []


def test_refusals_are_one_line_http_errors(tmp_path: Path) -> None:
    cfg, ctx = _setup(tmp_path)

    async def scenario() -> None:
        async with ManagerServer(cfg, FakeDevices()) as server:
            bad = MigrationMessage("ghost", "not-running", "out", "hv1", "hv2")
            with pytest.raises(MigrationMessageError, match="400: unknown VM 'ghost'"):
                await send_migration_message(server.url, bad, time.monotonic() + 5, ctx)

    asyncio.run(scenario())


def test_udp_store_out_then_in_and_the_hooks_abort(tmp_path: Path) -> None:
    cfg, ctx = _setup(tmp_path)
    devices = FakeDevices()
    devices.put("fw-a", ALL)

    async def scenario() -> None:
        async with ManagerServer(cfg, devices) as server:
            assert server.udp_port
            addr = ("127.0.0.1", server.udp_port)
            out = await asyncio.to_thread(client.send_udp, addr, msg(mode="store"))
            assert out and out["state"] == "stored"
            got = await asyncio.to_thread(client.send_udp, addr, msg("in", "store", "starting"))
            assert got and got["state"] == "committed"
            await server.migrator.wait_background()
            assert devices.has("fw-b", Kind.CONNTRACK) and not devices.has("fw-a", Kind.CONNTRACK)
            # The same datagrams again (no id: same content, within the window) change nothing.
            calls = len(devices.calls)
            again = await asyncio.to_thread(client.send_udp, addr, msg("in", "store", "starting"))
            assert again["duplicate"] and again["migration"] == got["migration"]
            assert len(devices.calls) == calls
            # A new "out" (its own id) deposits, then the hook cancels the migration: its abort drops it.
            devices.put("fw-a", ALL)
            second = await asyncio.to_thread(client.send_udp, addr, msg(mode="store", ident="m2-out"))
            assert second["state"] == "stored" and second["migration"] != out["migration"]
            await hook.tell_abort(hook.HookOptions("vm1", server.url, "hv1", "hv2", ssl_context=ctx))
            with pytest.raises(MigrationMessageError, match="no stored bundles"):
                await asyncio.to_thread(client.send_udp, addr, msg("in", "store", "starting", "m2-in"))

    asyncio.run(scenario())
    assert all(devices.has("fw-a", k) for k in ALL)
