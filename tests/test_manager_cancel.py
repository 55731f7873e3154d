"""An aborted migration's rollback reaches work still on its way (no root): the real manager
and three real agents (fake transfers) on 127.0.0.1 over mutual TLS.

In push mode the manager asks the source agent to push; the source exports slowly, the manager
is told to abort and gives up waiting (short grace), rolls back the destinations — and the
source's pushes reach them only afterwards. Agents refuse those late imports because the
rollback named the migration (``Xfer-Migration``): nothing is left at the destinations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml

from tests.agent_fakes import FakeTransfer
from tests.agent_fakes import config as agent_config
from tests.manager_fakes import TOPOLOGY
from xfer import pki
from xfer.agent.client import AgentClient
from xfer.agent.server import AgentServer
from xfer.agent.service import AgentService
from xfer.errors import XferError
from xfer.manager.config import ManagerConfig
from xfer.manager.server import ManagerServer
from xfer.model import Kind
from xfer.net import tls
from xfer.net.tls import TlsFiles

# Conntrack only (other kinds would attach datapaths at the agents' start): both devices on
# hv2's path take it.
KINDS = {"fw-a": (Kind.CONNTRACK,), "fw-b": (Kind.CONNTRACK,), "sw-b": (Kind.CONNTRACK,)}
OUT = {"vm": "vm1", "indication": "not-running", "direction": "out", "source": "hv1",
       "destination": "hv2", "mode": "push"}


def test_a_rollback_refuses_imports_that_arrive_after_it(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init_ca(d)
    for name in ("manager", *KINDS):
        pki.issue(d, name, ips=["127.0.0.1"])
    fakes = {name: FakeTransfer() for name in KINDS}
    fakes["fw-a"].on_export = lambda: time.sleep(0.6)
    logs: list[Any] = []

    async def scenario() -> None:
        agents: dict[str, AgentServer] = {}
        clients = []
        try:
            for name, kinds in KINDS.items():
                c = dataclasses.replace(agent_config(tmp_path / name, kinds, port=0), device_id=name,
                                        tls=TlsFiles(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem"))
                peers = AgentClient(tls.client_context(c.tls.ca, c.tls.cert, c.tls.key), timeout=10)
                clients.append(peers)
                agents[name] = AgentServer(c, AgentService(c, transfer=fakes[name], peers=peers))
                await agents[name].start()
            topo: dict[str, Any] = json.loads(json.dumps(TOPOLOGY))
            for name, a in agents.items():
                topo["devices"][name].update(kinds=["conntrack"], agent=a.url)
            (tmp_path / "topology.yaml").write_text(yaml.safe_dump(topo))
            cfg = ManagerConfig(topology=tmp_path / "topology.yaml", journal=tmp_path / "m.db", port=0,
                                tls=TlsFiles(d / "manager.pem", d / "manager.key", d / "ca.pem"))
            async with ManagerServer(cfg) as server:
                server.migrator.abort_grace_s = 0.1
                moving = asyncio.ensure_future(server.handle(OUT, "http"))
                await asyncio.sleep(0.2)            # the source is exporting
                logs.append(await server.handle({"vm": "vm1", "indication": "abort"}, "http"))
                try:
                    await moving
                except XferError as exc:
                    logs.append(str(exc))
                await asyncio.sleep(1.5)            # the source's pushes arrive, after the rollback
                logs.append(server.migrator.journal.recent(1)[0])
        finally:
            for a in agents.values():
                await a.stop()
            for c in clients:
                await c.close()

    asyncio.run(scenario())
    answer, error, record = logs
    assert answer["aborted"] and "aborted" in error and record.outcome == "aborted"
    assert fakes["fw-a"].exported, "the source never exported: the scenario did not happen"
    # The rollback came first at each destination; the late pushes were refused, nothing imported.
    assert fakes["fw-b"].forgotten and fakes["sw-b"].forgotten
    assert fakes["fw-b"].imported == [] and fakes["sw-b"].imported == []
    assert fakes["fw-a"].forgotten == [], "the source lost state"
