"""``xfer bench etcd``: migrations through a manager whose journal is on etcd (a local one-member
etcd started for the run) against the same manager on SQLite, same run.

The agents are instant stand-ins (export, import and forget return at once, no
network), so what is measured is the manager itself: message in, journal, answer
out, over mutual TLS on loopback. Each migration moves the VM between two servers
(relay mode) and is timed at the client, as the hook times it; the backends take
turns, one migration each, so load on the machine hits both alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xfer import pki
from xfer.bench.common import Echo, median, write_results
from xfer.lab.etcd import EtcdProcess
from xfer.manager.config import JournalConfig, ManagerConfig
from xfer.manager.server import ManagerServer
from xfer.model import Kind, VmIdentity
from xfer.net import tls
from xfer.net.message import MigrationMessage, Mode
from xfer.net.notify import ManagerLink
from xfer.net.tls import TlsFiles

TOPOLOGY = {
    "servers": {"hv1": {"gateway": "gw"}, "hv2": {"gateway": "gw"}},
    "gateways": ["gw"],
    "devices": {"fw-a": {"type": "firewall", "kinds": ["conntrack"], "agent": "https://10.0.4.1:7443"},
                "fw-b": {"type": "firewall", "kinds": ["conntrack"], "agent": "https://10.0.4.2:7443"}},
    "links": [["hv1", "fw-a"], ["fw-a", "gw"], ["hv2", "fw-b"], ["fw-b", "gw"]],
    "vms": {"vm1": {"mac": "02:00:00:00:00:02", "ipv4": ["10.0.1.2"]}},
}


class _Instant:
    """Agents that answer at once: the manager's own cost is all that is left."""

    async def export(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> bytes:
        return b"{}"

    async def import_(self, url: str, data: bytes, vm: VmIdentity,
                      kinds: Sequence[Kind] | None = None) -> dict[str, Any]:
        return {"created": 1, "failed": 0, "kinds": {k.value: {"created": 1} for k in kinds or ()}}

    async def forget(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> dict[str, Any]:
        return {k.value: {"deleted": 1} for k in kinds}

    async def push(self, url: str, vm: VmIdentity, kinds: Sequence[Kind], destination: str) -> dict[str, Any]:
        return {"destination": destination, "report": await self.import_(destination, b"", vm, kinds),
                "ok": True}

    async def pull(self, url: str, vm: VmIdentity, kinds: Sequence[Kind], source: str) -> dict[str, Any]:
        return await self.import_(url, b"", vm, kinds)


async def _measure(configs: dict[str, ManagerConfig], ctx: Any, count: int) -> dict[str, list[float]]:
    servers = {name: ManagerServer(cfg, _Instant()) for name, cfg in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            await server.start()
        async with asyncio.timeout(30):
            while not all(s.leading for s in servers.values()):
                await asyncio.sleep(0.05)
        links = {name: ManagerLink(s.url, ctx) for name, s in servers.items()}
        for i in range(count + 1):
            src, dst = ("hv1", "hv2") if i % 2 == 0 else ("hv2", "hv1")
            for name, link in links.items():
                await link.open(1)
                started = time.perf_counter()
                msg = MigrationMessage("vm1", "not-running", "out", src, dst, None, Mode.RELAY)
                report = await link.send(msg, time.monotonic() + 30)
                if i:   # the first migration of each warms the connection pools up
                    times[name].append((time.perf_counter() - started) * 1000)
                assert report["state"] == "committed", report
                await servers[name].migrator.wait_background()
    finally:
        for server in servers.values():
            await server.stop()
    return times


def run(count: int, out: Path, echo: Echo = None) -> dict[str, Any]:
    """``count`` migrations through each backend; medians, p90 and the etcd/SQLite ratio."""
    say = echo or (lambda s: None)
    with tempfile.TemporaryDirectory(prefix="xfer-bench-etcd-") as tmp:
        base = Path(tmp)
        pki.init_ca(base / "pki")
        pki.issue(base / "pki", "manager", ips=["127.0.0.1"])
        pki.issue(base / "pki", "hv1")
        (base / "topology.yaml").write_text(json.dumps(TOPOLOGY))
        p = base / "pki"
        sqlite = ManagerConfig(topology=base / "topology.yaml",
                               tls=TlsFiles(p / "manager.pem", p / "manager.key", p / "ca.pem"),
                               journal=base / "m.db", port=0, settings=_age_out())
        ctx = tls.client_context(p / "ca.pem", p / "hv1.pem", p / "hv1.key")
        with EtcdProcess(base / "etcd") as etcd:
            etcd.start()
            on_etcd = dataclasses.replace(sqlite, backend=JournalConfig("etcd", endpoints=(etcd.url,)))
            times = asyncio.run(_measure({"sqlite": sqlite, "etcd": on_etcd}, ctx, count))
    result: dict[str, Any] = {"migrations": count, "baseline_tool": "the same manager, SQLite journal"}
    for name, values in times.items():
        ordered = sorted(values)
        result[name] = {"median_ms": round(median(values), 3),
                        "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1], 3)}
    result["overhead_ms"] = round(result["etcd"]["median_ms"] - result["sqlite"]["median_ms"], 3)
    result["ratio"] = round(result["etcd"]["median_ms"] / result["sqlite"]["median_ms"], 2)
    say(f"per migration: etcd {result['etcd']['median_ms']:.2f} ms (p90 {result['etcd']['p90_ms']:.2f}), "
        f"sqlite {result['sqlite']['median_ms']:.2f} ms (p90 {result['sqlite']['p90_ms']:.2f}); "
        f"etcd adds {result['overhead_ms']:.2f} ms (x{result['ratio']})")
    result["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    write_results(out, result)
    return result


def _age_out() -> Any:
    from xfer.manager.settings import Settings

    # The source keeps its state: every migration is the same work, no cleanup after the answer.
    return Settings(cleanup="age-out")  # type: ignore[arg-type]
