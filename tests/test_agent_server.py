"""The agent's HTTP layer over real mutual TLS on loopback, with a fake transfer API:
who gets in, how refusals travel back to the client, push between two agents,
the log line and the metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agent_fakes import VM, FakeTransfer, bundle_bytes, config
from xfer import pki
from xfer.agent.client import AgentClient
from xfer.agent.config import AgentConfig
from xfer.agent.server import AgentServer
from xfer.agent.service import AgentService
from xfer.errors import AgentError, AuthError, BundleError, ForeignEntryError
from xfer.model import Kind
from xfer.net import tls
from xfer.net.tls import TlsFiles


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    pki.init_ca(d)
    for name in ("src", "dst", "operator"):
        pki.issue(d, name, ips=["127.0.0.1"])
    pki.init_ca(tmp_path / "rogue", "rogue")
    pki.issue(tmp_path / "rogue", "operator")
    return d


def _config(tmp_path: Path, name: str, **kw: Any) -> AgentConfig:
    d = tmp_path / "pki"
    cfg = config(tmp_path / name, port=0, **kw)
    return dataclasses.replace(cfg, device_id=name,
                               tls=TlsFiles(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem"))


def _client(d: Path, name: str | None = "operator", ca: Path | None = None) -> AgentClient:
    cert = (d / f"{name}.pem", d / f"{name}.key") if name else (None, None)
    return AgentClient(tls.client_context(ca or d.parent / "pki" / "ca.pem", *cert), timeout=10)


Scenario = Callable[[AgentServer, FakeTransfer], Awaitable[None]]


def _run(tmp_path: Path, scenario: Scenario, **cfg: Any) -> FakeTransfer:
    fake = FakeTransfer()

    async def main() -> None:
        c = _config(tmp_path, "dst", **cfg)
        async with AgentClient(tls.client_context(c.tls.ca, c.tls.cert, c.tls.key)) as peers, \
                AgentServer(c, AgentService(c, transfer=fake, peers=peers)) as server:
            await scenario(server, fake)

    asyncio.run(main())
    return fake


def test_authenticated_client_round_trip(tmp_path: Path, ca: Path) -> None:
    async def scenario(server: AgentServer, fake: FakeTransfer) -> None:
        async with _client(ca) as c:
            assert (await c.health(server.url))["device"] == "dst"
            data = await c.export(server.url, VM, [Kind.CONNTRACK])
            report = await c.import_(server.url, data, VM, [Kind.CONNTRACK])
            assert report["created"] == 3 and report["failed"] == 0
            assert (await c.forget(server.url, VM, [Kind.CONNTRACK]))["conntrack"]["deleted"] == 1

    fake = _run(tmp_path, scenario)
    assert fake.imported == [Kind.CONNTRACK] and len(fake.forgotten) == 1


@pytest.mark.parametrize("who", ["no-certificate", "other-ca", "not-allowed"])
def test_unauthenticated_clients_are_refused(tmp_path: Path, ca: Path, who: str) -> None:
    async def scenario(server: AgentServer, fake: FakeTransfer) -> None:
        if who == "no-certificate":
            client, error, text = _client(ca, None), AuthError, "no certificate"
        elif who == "other-ca":
            client = _client(tmp_path / "rogue", "operator", ca=ca / "ca.pem")
            error, text = AgentError, "refused this client's certificate"
        else:
            client, error, text = _client(ca), AuthError, "not among this agent's allowed peers"
        async with client as c:
            with pytest.raises(error, match=text):
                await c.import_(server.url, bundle_bytes(), VM)

    allowed = frozenset({"manager"}) if who == "not-allowed" else frozenset()
    fake = _run(tmp_path, scenario, allowed_peers=allowed)
    assert fake.imported == []


def test_client_refuses_an_agent_signed_by_another_ca(tmp_path: Path, ca: Path) -> None:
    async def scenario(server: AgentServer, fake: FakeTransfer) -> None:
        rogue = tmp_path / "rogue"
        async with _client(rogue, "operator", ca=rogue / "ca.pem") as c:
            with pytest.raises(AuthError, match="TLS refused"):
                await c.health(server.url)

    _run(tmp_path, scenario)


def test_refusals_travel_back_as_errors(tmp_path: Path, ca: Path) -> None:
    async def scenario(server: AgentServer, fake: FakeTransfer) -> None:
        async with _client(ca) as c:
            with pytest.raises(ForeignEntryError, match=f"agent {server.url}: bundle holds state"):
                await c.import_(server.url, bundle_bytes(), VM.__class__("x", ipv4=("10.9.9.9",)))
            with pytest.raises(AgentError, match="does not hold dhcp") as info:
                await c.export(server.url, VM, [Kind.DHCP])
            assert (info.value.status, info.value.remote_type) == (400, "UsageError")
            with pytest.raises(BundleError, match="over this device's limit"):
                await c.import_(server.url, b"\0" * 9000, VM)

    fake = _run(tmp_path, scenario, max_bundle_bytes=8192)
    assert fake.imported == []


def test_push_goes_straight_to_the_destination(tmp_path: Path, ca: Path) -> None:
    src_fake = FakeTransfer()

    async def scenario(dst: AgentServer, dst_fake: FakeTransfer) -> None:
        c = _config(tmp_path, "src")
        async with AgentClient(tls.client_context(c.tls.ca, c.tls.cert, c.tls.key)) as peers, \
                AgentServer(c, AgentService(c, transfer=src_fake, peers=peers)) as src, \
                _client(ca) as op:
            result = await op.push(src.url, VM, [Kind.CONNTRACK], dst.url)
            assert result["ok"] and result["report"]["created"] == 3
            report = await op.pull(dst.url, VM, [Kind.CONNTRACK], src.url)
            assert report["created"] == 3
        assert dst_fake.imported == [Kind.CONNTRACK, Kind.CONNTRACK]

    _run(tmp_path, scenario)
    assert src_fake.forgotten == [] and len(src_fake.exported) == 2


def test_log_line_and_metrics(tmp_path: Path, ca: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics: list[str] = []

    async def scenario(server: AgentServer, fake: FakeTransfer) -> None:
        async with _client(ca) as c:
            await c.import_(server.url, bundle_bytes(), VM)
            with pytest.raises(ForeignEntryError):
                await c.import_(server.url, bundle_bytes(), VM.__class__("x", ipv4=("10.9.9.9",)))
            session = c._session
            assert session is not None
            async with session.get(f"{server.url}/metrics") as resp:
                metrics.append(await resp.text())

    with caplog.at_level(logging.INFO, logger="xfer.agent"):
        _run(tmp_path, scenario)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "xfer.agent"]
    assert all(list(x)[:3] == ["ts", "level", "event"] for x in lines)
    imports = [x for x in lines if x.get("op") == "import"]
    assert [x["level"] for x in imports] == ["info", "warning"] and imports[0]["event"] == "request"
    assert [x["status"] for x in imports] == [200, 422]
    assert imports[0]["peer"] == "operator" and imports[0]["entries"] == {"conntrack": 3}
    assert {"receive", "decode", "import"} <= set(imports[0]["phases_ms"])
    assert "not of the VM" in imports[1]["error"]
    text = metrics[0]
    assert 'xfer_agent_requests_total{op="import",outcome="ok"} 1.0' in text
    assert 'xfer_agent_requests_total{op="import",outcome="refused"} 1.0' in text
    assert 'xfer_agent_entries_total{kind="conntrack",op="import"} 3.0' in text
    assert 'xfer_agent_phase_seconds_count{op="import",phase="import"} 1.0' in text
    assert 'xfer_build_info{daemon="agent",python="' in text
    assert "process_resident_memory_bytes " in text and "process_cpu_seconds_total " in text


def test_a_bug_is_a_500_and_one_json_log_line_with_its_traceback(tmp_path: Path, ca: Path) -> None:
    import io

    from xfer.net.log import daemon_logging

    class Broken(FakeTransfer):
        def export_bundle(self, *args: Any, **kw: Any) -> Any:
            raise RuntimeError("a bug")

    async def main() -> None:
        c = _config(tmp_path, "dst")
        async with AgentServer(c, AgentService(c, transfer=Broken())) as server, _client(ca) as client:
            with pytest.raises(AgentError, match="internal error: RuntimeError: a bug"):
                await client.export(server.url, VM, [Kind.CONNTRACK])

    stream = io.StringIO()
    undo = daemon_logging(stream=stream)
    try:
        asyncio.run(main())
    finally:
        undo()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]   # every line is JSON
    bug = [x for x in lines if x["event"] == "internal error"]
    assert len(bug) == 1 and bug[0]["level"] == "error" and bug[0]["op"] == "export"
    assert bug[0]["traceback"][0].startswith("Traceback") and "RuntimeError: a bug" in bug[0]["traceback"][-1]
    assert [x["status"] for x in lines if x["event"] == "request"] == [500]
