"""`xfer bench agents`: what the network and mutual TLS add to a transfer.

One run builds a source and a destination namespace joined by the agents' own
link, fills the source with ``vm_flows`` of the VM's conntrack entries (among
``total``), starts an agent in each, and times, back to back in each round:

  (a) in-process  export → bundle bytes → decode → import (the baseline)
  (b) push        operator → source agent: export, send to the destination agent, import
  (c) pull        operator → destination agent: fetch from the source agent, import

The operator's client stays connected across rounds, as a manager would; the
first round (cold TLS connections) is reported on its own and left out of the
medians. After each contender the destination must hold exactly the VM's
entries; it is then flushed. Overhead = contender - in-process of the same round.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer import transfer
from xfer.agent import tls
from xfer.agent.client import AgentClient
from xfer.bench.common import Echo, median, write_results
from xfer.bench.conntrack import VM_IP, fill
from xfer.lab.agents import DST_AGENT_IP, OPERATOR, SRC_AGENT_IP, LabAgents
from xfer.lab.hosts import Hosts
from xfer.model import Kind, parse_vm

TARGET_OVERHEAD_S = 0.020


def _vm_entries(ns: str) -> int:
    return len(transfer.kind_module(Kind.CONNTRACK).export_entries(parse_vm(VM_IP, {}), ns))


def _phases(log: str, op: str, last: int) -> dict[str, float]:
    """Median time of each phase of the agent's last ``last`` ``op`` requests (from its JSON log)."""
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("op") == op and r.get("status") == 200][-last:]
    names = {name for r in mine for name in r["phases_ms"]} | {"total"}
    return {name: median([r["ms"] if name == "total" else r["phases_ms"].get(name, 0.0) for r in mine])
            for name in sorted(names)} if mine else {}


def run(vm_flows: int, total: int, repeat: int, out: Path, echo: Echo = print) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``out``) the figures."""
    say = echo or (lambda _m: None)
    vm = parse_vm(VM_IP, {})
    kinds = [Kind.CONNTRACK]
    runs: dict[str, list[float]] = {"in_process": [], "push": [], "pull": []}
    dst_import_s: list[float] = []
    split: dict[str, list[float]] = {"export": [], "import": []}
    size: list[int] = []
    cold: dict[str, float] = {}
    with Hosts("xa") as hosts, tempfile.TemporaryDirectory(prefix="xfer-bench-agents-") as tmp:
        src, dst = hosts.add("src"), hosts.add("dst")
        fill(src, total, vm_flows)
        agents = LabAgents(hosts, Path(tmp))
        agents.link(src, dst)
        a_src = agents.start("bench-src", src, SRC_AGENT_IP, [k.value for k in kinds])
        a_dst = agents.start("bench-dst", dst, DST_AGENT_IP, [k.value for k in kinds])
        pki = agents.pki

        def settle(label: str) -> None:
            mine = _vm_entries(dst)
            if mine != vm_flows:
                raise RuntimeError(f"{label}: destination holds {mine} of the VM's entries, "
                                   f"expected {vm_flows}")
            hosts.run(dst, ["conntrack", "-F"])

        async def rounds() -> None:
            ctx = tls.client_context(pki / "ca.pem", pki / f"{OPERATOR}.pem", pki / f"{OPERATOR}.key")
            async with AgentClient(ctx, namespace=src) as client:
                for n in range(repeat + 1):
                    t0 = time.perf_counter()
                    data = bundle_mod.encode(transfer.export_bundle(vm, kinds, src))
                    export_s = time.perf_counter() - t0
                    report = transfer.import_bundle(bundle_mod.decode(data), dst)
                    in_process = time.perf_counter() - t0
                    if not report.ok:
                        raise RuntimeError(f"in-process import failed: {report.to_dict()}")
                    settle("in-process")

                    t0 = time.perf_counter()
                    pushed = await client.push(a_src.url, vm, kinds, a_dst.url)
                    push = time.perf_counter() - t0
                    if not pushed["ok"]:
                        raise RuntimeError(f"push failed: {pushed}")
                    settle("push")

                    t0 = time.perf_counter()
                    await client.pull(a_dst.url, vm, kinds, a_src.url)
                    pull = time.perf_counter() - t0
                    settle("pull")
                    if n == 0:
                        cold.update(in_process=in_process, push=push, pull=pull)
                        say(f"cold round (new TLS connections): in-process {in_process * 1000:.1f} ms, "
                            f"push {push * 1000:.1f} ms, pull {pull * 1000:.1f} ms")
                        continue
                    runs["in_process"].append(in_process)
                    split["export"].append(export_s)
                    split["import"].append(in_process - export_s)
                    size.append(len(data))
                    runs["push"].append(push)
                    runs["pull"].append(pull)
                    dst_import_s.append(float(pushed["report"]["seconds"]))
                    say(f"round {n}/{repeat}: in-process {in_process * 1000:.1f} ms, "
                        f"push {push * 1000:.1f} ms, pull {pull * 1000:.1f} ms")

        asyncio.run(rounds())
        phases = {f"{a.name}:{op}": _phases(a.log_text(), op, repeat)
                  for a, op in ((a_src, "push"), (a_dst, "import"), (a_dst, "pull"), (a_src, "export"))}

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
    result: dict[str, Any] = {
        "benchmark": "agents", "vm_flows": vm_flows, "total": total, "repeat": repeat,
        "kinds": [k.value for k in kinds],
        "baseline": "in-process export + encode + decode + import, same run",
        "baseline_s": base, "bundle_bytes": max(size),
        "in_process_export_s": median(split["export"]), "in_process_import_s": median(split["import"]),
        "destination_import_s": median(dst_import_s),
        "cold": cold, "scenarios": scenarios, "agent_phases_ms": phases, "runs": runs,
    }
    write_results(out, result)
    for name, s in scenarios.items():
        say(f"{name}: {s['xfer_s'] * 1000:.1f} ms vs in-process {base * 1000:.1f} ms → "
            f"+{s['overhead_s'] * 1000:.1f} ms ({s['ratio']:.2f}×; target +"
            f"{TARGET_OVERHEAD_S * 1000:.0f} ms)")
    say(f"  in-process: export+encode {median(split['export']) * 1000:.1f} ms, decode+import "
        f"{median(split['import']) * 1000:.1f} ms; bundle {max(size)} bytes")
    for name, ph in phases.items():
        say(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()) + " ms")
    say(f"results in {out}")
    return result
