"""`xfer bench agents`: what the network and mutual TLS add to a transfer.

One run builds a source and a destination namespace joined by the agents' own
link, fills the source with ``vm_flows`` of the VM's conntrack entries (among
``total``), starts an agent in each, and times, back to back in each round:

  (a) in-process  export → bundle bytes → decode → import (the baseline)
  (b) push        operator → source agent: export, send to the destination agent, import
  (c) pull        operator → destination agent: fetch from the source agent, import

Where this build has counters (DHCP snooping), the VM also has a counted port
(a binding) at the source, and every contender moves those kinds too. The
contenders take turns at running first in a round.

The operator's client stays connected across rounds, as a manager would; the
first round (cold TLS connections) is reported on its own and left out of the
medians. After each contender the destination must hold exactly the VM's
conntrack entries; then its state is cleared. Overhead = contender - in-process
of the same round.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer import transfer
from xfer.agent.client import AgentClient
from xfer.bench.common import Echo, median, write_results
from xfer.bench.conntrack import VM_IP, fill
from xfer.lab.agents import (
    DST_AGENT_IP,
    OPERATOR,
    SRC_AGENT_IP,
    AgentProcess,
    LabAgents,
    device_toml,
    kind_available,
    unpin,
)
from xfer.lab.hosts import Hosts
from xfer.model import Kind, VmIdentity, parse_vm
from xfer.net import tls

TARGET_OVERHEAD_S = 0.020
ROUTE = ("in_process", "push", "pull")


@dataclass
class Site:
    """Both namespaces with their agents, and the VM whose state moves."""

    hosts: Hosts
    src: str
    dst: str
    vm: VmIdentity
    kinds: list[Kind]
    vm_flows: int
    agents: LabAgents
    a_src: AgentProcess
    a_dst: AgentProcess

    def settle(self, label: str) -> None:
        """Check the destination got exactly the VM's entries, then clear its state."""
        mine = len(transfer.kind_module(Kind.CONNTRACK).export_entries(self.vm, self.dst))
        if mine != self.vm_flows:
            raise RuntimeError(f"{label}: destination holds {mine} of the VM's entries, "
                               f"expected {self.vm_flows}")
        self.hosts.run(self.dst, ["conntrack", "-F"])
        others = [k for k in self.kinds if k is not Kind.CONNTRACK]
        if others:
            # Counters are added on import: clear them, or every round adds up.
            transfer.forget(self.vm, others, self.dst)


@dataclass
class Figures:
    runs: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ROUTE})
    export_s: list[float] = field(default_factory=list)
    dst_import_s: list[float] = field(default_factory=list)
    size: int = 0
    cold: dict[str, float] = field(default_factory=dict)


def _vm_port(hosts: Hosts, src: str, dst: str) -> str:
    """A VM behind ``src``'s ``vm0`` and a ``vm0`` on ``dst`` for the datapath to attach to
    (a veth with both ends there: this kernel has no dummy driver). Returns the VM's MAC."""
    vm_ns = hosts.add("vm")
    hosts.veth(vm_ns, "eth0", src, "vm0", f"{VM_IP}/24", "10.0.1.1/24")
    hosts.check(dst, ["ip", "link", "add", "vm0", "type", "veth", "peer", "name", "vm0p"])
    hosts.link_up(dst, "vm0")
    return str(json.loads(hosts.check(vm_ns, ["ip", "-j", "link", "show", "eth0"]))[0]["address"])


def _vm_traffic(hosts: Hosts, src: str, mac: str, dhcp: bool) -> None:
    """A binding for the VM (it passes the source guard) and counted traffic."""
    if dhcp:
        from xfer.dhcp.device import add_static
        from xfer.dhcp.model import Binding

        add_static(src, Binding(mac, VM_IP, None, "vm0", source="static"))
    hosts.check(hosts.name("vm"), ["ping", "-q", "-c", "5", "-i", "0.01", "10.0.1.1"])
    hosts.run(src, ["conntrack", "-D", "-p", "icmp"])  # the entry count is the fill's


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextmanager
def _site(vm_flows: int, total: int) -> Iterator[Site]:
    counters = kind_available("xfer.counters.device")
    dhcp = kind_available("xfer.dhcp.device")
    datapath = counters or dhcp
    kinds = [Kind.CONNTRACK, *([Kind.COUNTERS] if counters else []), *([Kind.DHCP] if dhcp else [])]
    with Hosts("xa") as hosts, tempfile.TemporaryDirectory(prefix="xfer-bench-agents-") as tmp, \
            _env("XFER_DHCP_STATE_DIR", str(Path(tmp) / "dhcp") if datapath else None):
        # (The agents inherit the DHCP database directory: it stays in tmp.)
        src, dst = hosts.add("src"), hosts.add("dst")
        try:
            vm, extra = parse_vm(VM_IP, {}), ""
            if datapath:
                vm = parse_vm(f"{VM_IP},{_vm_port(hosts, src, dst)}", {})
                extra = device_toml(["vm0"] if counters else [], "ag0" if dhcp else "",
                                    ["vm0"] if dhcp else [])
            fill(src, total, vm_flows)
            agents = LabAgents(hosts, Path(tmp))
            agents.link(src, dst)
            names = [k.value for k in kinds]
            a_src = agents.start("bench-src", src, SRC_AGENT_IP, names, extra=extra)
            a_dst = agents.start("bench-dst", dst, DST_AGENT_IP, names, extra=extra)
            if datapath:
                _vm_traffic(hosts, src, vm.macs[0], dhcp)
            yield Site(hosts, src, dst, vm, kinds, vm_flows, agents, a_src, a_dst)
        finally:
            hosts.close()
            unpin([src, dst])


async def _rounds(site: Site, repeat: int, say: Echo) -> Figures:
    figures = Figures()
    pki = site.agents.pki
    ctx = tls.client_context(pki / "ca.pem", pki / f"{OPERATOR}.pem", pki / f"{OPERATOR}.key")
    vm, kinds = site.vm, site.kinds
    extra: dict[str, float] = {}

    async def in_process() -> None:
        t0 = time.perf_counter()
        data = bundle_mod.encode(transfer.export_bundle(vm, kinds, site.src))
        extra["export_s"], extra["size"] = time.perf_counter() - t0, len(data)
        report = transfer.import_bundle(bundle_mod.decode(data), site.dst)
        if not report.ok:
            raise RuntimeError(f"in-process import failed: {report.to_dict()}")

    async def push() -> None:
        pushed = await client.push(site.a_src.url, vm, kinds, site.a_dst.url)
        if not pushed["ok"]:
            raise RuntimeError(f"push failed: {pushed}")
        extra["dst_import_s"] = float(pushed["report"]["seconds"])

    async def pull() -> None:
        await client.pull(site.a_dst.url, vm, kinds, site.a_src.url)

    contenders = {"in_process": in_process, "push": push, "pull": pull}
    async with AgentClient(ctx, namespace=site.src) as client:
        for n in range(repeat + 1):
            # Each round starts with another contender, so that none always runs first.
            order = list(ROUTE[n % 3:] + ROUTE[:n % 3])
            times: dict[str, float] = {}
            for name in order:
                gc.collect()  # the same clean heap for every contender
                t0 = time.perf_counter()
                await contenders[name]()
                times[name] = time.perf_counter() - t0
                site.settle(name)
            line = ", ".join(f"{k.replace('_', '-')} {times[k] * 1000:.1f} ms" for k in ROUTE)
            if n == 0:
                figures.cold = times
                if say:
                    say(f"cold round (new TLS connections): {line}")
                continue
            for k, v in times.items():
                figures.runs[k].append(v)
            figures.export_s.append(extra["export_s"])
            figures.dst_import_s.append(extra["dst_import_s"])
            figures.size = int(extra["size"])
            if say:
                say(f"round {n}/{repeat}: {line}")
    return figures


def _requests(log: str, op: str, last: int) -> list[dict[str, Any]]:
    """The agent's last ``last`` successful ``op`` requests, from its JSON log."""
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [r for r in records if r.get("op") == op and r.get("status") == 200][-last:]


def _transport_ms(site: Site, last: int) -> float:
    """Median, over the pushes, of what the wire costs: the source's send phase minus the
    destination's whole handling of the import (left: compression, TLS, TCP, HTTP)."""
    sent = _requests(site.a_src.log_text(), "push", last)
    handled = _requests(site.a_dst.log_text(), "import", last)
    return median([s["phases_ms"]["send"] - h["ms"] for s, h in zip(sent, handled, strict=True)])


def _phases(log: str, op: str, last: int) -> dict[str, float]:
    """Median time of each phase of the agent's last ``last`` ``op`` requests (from its JSON log)."""
    mine = _requests(log, op, last)
    names = {name for r in mine for name in r["phases_ms"]} | {"total"}
    return {name: median([r["ms"] if name == "total" else r["phases_ms"].get(name, 0.0) for r in mine])
            for name in sorted(names)} if mine else {}


def run(vm_flows: int, total: int, repeat: int, out: Path, echo: Echo = print) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``out``) the figures."""
    say = echo or (lambda _m: None)
    with _site(vm_flows, total) as site:
        say(f"moving {', '.join(k.value for k in site.kinds)} of VM {VM_IP}: {vm_flows} conntrack "
            f"entries (of {total} in the source table)")
        figures = asyncio.run(_rounds(site, repeat, say))
        phases = {f"{a.name}:{op}": _phases(a.log_text(), op, repeat)
                  for a, op in ((site.a_src, "push"), (site.a_dst, "import"), (site.a_dst, "pull"),
                                (site.a_src, "export"))}
        kinds = [k.value for k in site.kinds]
        transport_ms = _transport_ms(site, repeat)

    runs = figures.runs
    base = median(runs["in_process"])
    scenarios: dict[str, Any] = {}
    for name in ("push", "pull"):
        pairs = list(zip(runs["in_process"], runs[name], strict=True))
        overhead = median([x - b for b, x in pairs])
        scenarios[name] = {
            "baseline_s": base, "xfer_s": median(runs[name]),
            "ratio": median([x / b for b, x in pairs]),
            "overhead_s": overhead, "target_overhead_s": TARGET_OVERHEAD_S,
            "meets_target": overhead < TARGET_OVERHEAD_S,
        }
    in_export = median(figures.export_s)
    result: dict[str, Any] = {
        "benchmark": "agents", "vm_flows": vm_flows, "total": total, "repeat": repeat, "kinds": kinds,
        "baseline": "in-process export + encode + decode + import, same run",
        "baseline_s": base, "bundle_bytes": figures.size,
        "in_process_export_s": in_export, "in_process_import_s": base - in_export,
        "destination_import_s": median(figures.dst_import_s),
        "push_transport_s": transport_ms / 1000,
        "cold": figures.cold, "scenarios": scenarios, "agent_phases_ms": phases, "runs": runs,
    }
    write_results(out, result)
    for name, s in scenarios.items():
        say(f"{name}: {s['xfer_s'] * 1000:.1f} ms vs in-process {base * 1000:.1f} ms → "
            f"+{s['overhead_s'] * 1000:.1f} ms ({s['ratio']:.2f}×; target +"
            f"{TARGET_OVERHEAD_S * 1000:.0f} ms)")
    say(f"  push on the wire (compression, TLS, TCP, HTTP; from the agents' logs): "
        f"{transport_ms:.1f} ms")
    say(f"  in-process: export+encode {in_export * 1000:.1f} ms, decode+import "
        f"{(base - in_export) * 1000:.1f} ms; bundle {figures.size} bytes")
    for name, ph in phases.items():
        say(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()) + " ms")
    say(f"results in {out}")
    return result
