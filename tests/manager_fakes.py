"""A fake device layer for manager tests: each agent URL holds a set of (VM id, kind)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from xfer.errors import AgentError
from xfer.manager import topology
from xfer.model import Kind, VmIdentity

TOPOLOGY = {
    "servers": {"hv1": {"gateway": "gw"}, "hv2": {"gateway": "gw"}, "hv3": {"gateway": "gw"}},
    "gateways": ["gw"],
    "devices": {
        "fw-a": {"type": "firewall", "kinds": ["conntrack", "dhcp", "counters"],
                 "agent": "https://10.0.4.1:7443"},
        "rt-a": {"type": "router", "kinds": []},
        "fw-b": {"type": "firewall", "kinds": ["conntrack", "counters"], "agent": "https://10.0.4.2:7443"},
        "sw-b": {"type": "switch", "kinds": ["dhcp"], "agent": "https://10.0.4.3:7443"},
        "fw-c": {"type": "firewall", "kinds": ["conntrack"], "agent": "https://10.0.4.4:7443"},
    },
    "links": [["hv1", "fw-a"], ["fw-a", "rt-a"], ["rt-a", "gw"],
              ["hv2", "sw-b"], ["sw-b", "fw-b"], ["fw-b", "gw"],
              ["hv3", "fw-c"], ["fw-c", "gw"]],
    "vms": {"vm1": {"mac": "02:00:00:00:00:02", "ipv4": ["10.0.1.2"]}},
}
URL = {name: spec.get("agent", "") for name, spec in TOPOLOGY["devices"].items()}  # type: ignore[attr-defined]


def topo() -> topology.Topology:
    return topology.parse(json.loads(json.dumps(TOPOLOGY)))


@dataclass
class FakeDevices:
    """State per agent URL; ``fail``: URLs whose imports fail; ``hang``: URLs whose imports wait
    for ``release``; ``unreachable``: URLs whose forget cannot reach the agent."""

    held: dict[str, set[tuple[str, Kind]]] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)
    hang: set[str] = field(default_factory=set)
    unreachable: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, tuple[Kind, ...]]] = field(default_factory=list)
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def has(self, device: str, kind: Kind, vm: str = "vm1") -> bool:
        return (vm, kind) in self.held.get(URL[device], set())

    def put(self, device: str, kinds: Sequence[Kind], vm: str = "vm1") -> None:
        self.held.setdefault(URL[device], set()).update((vm, k) for k in kinds)

    async def export(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> bytes:
        self.calls.append(("export", url, tuple(kinds)))
        have = [k.value for k in kinds if (vm.id, k) in self.held.get(url, set())]
        return json.dumps({"vm": vm.id, "kinds": have}).encode()

    async def import_(self, url: str, data: bytes, vm: VmIdentity,
                      kinds: Sequence[Kind] | None = None) -> dict[str, Any]:
        self.calls.append(("import", url, tuple(kinds or ())))
        if url in self.hang:
            self.hanging.set()
            await self.release.wait()
        body = json.loads(data)
        wanted = [k for k in (kinds or ()) if k.value in body["kinds"]]
        # Like the agent: an import is applied, then (failing) rolled back by the agent itself.
        if url in self.fail:
            return {"failed": 1, "kinds": {k.value: {"error": "refused by test"} for k in wanted}}
        self.held.setdefault(url, set()).update((vm.id, k) for k in wanted)
        return {"created": len(wanted), "failed": 0, "kinds": {k.value: {"created": 1} for k in wanted}}

    async def forget(self, url: str, vm: VmIdentity, kinds: Sequence[Kind]) -> dict[str, Any]:
        self.calls.append(("forget", url, tuple(kinds)))
        if url in self.unreachable:
            raise AgentError(f"agent {url}: connection refused (test)")
        self.held.get(url, set()).difference_update((vm.id, k) for k in kinds)
        return {k.value: {"deleted": 1} for k in kinds}

    async def push(self, url: str, vm: VmIdentity, kinds: Sequence[Kind], destination: str) -> dict[str, Any]:
        self.calls.append(("push", url, tuple(kinds)))
        data = await self.export(url, vm, kinds)
        report = await self.import_(destination, data, vm, kinds)
        return {"destination": destination, "report": report, "ok": report["failed"] == 0}

    async def pull(self, url: str, vm: VmIdentity, kinds: Sequence[Kind], source: str) -> dict[str, Any]:
        self.calls.append(("pull", url, tuple(kinds)))
        return await self.import_(url, await self.export(source, vm, kinds), vm, kinds)

    def ops(self, name: str) -> list[tuple[str, tuple[Kind, ...]]]:
        return [(u, k) for n, u, k in self.calls if n == name]
