"""`xfer bench conntrack`: move a VM's entries out of a big table, against conntrack(8).

One run builds a source and a destination namespace, fills the source table with
``total`` entries of which ``vm_flows`` belong to the VM, and times:

  (a) baseline  ``conntrack -L -s VM -o save | conntrack -R -`` across the namespaces
  (b) xfer in-process: export → bundle bytes → import
  (c) xfer as whole processes: ``xfer export`` then ``xfer import``

After each run the destination must hold exactly the VM's entries; it is then
flushed for the next. Ratios are baseline time / xfer time (higher is better).
"""

from __future__ import annotations

import ipaddress
import os
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer import netns, transfer
from xfer.bench.common import Echo, compile_bytecode, median, run_process, run_shell, write_results
from xfer.conntrack import constants as c
from xfer.conntrack import wire
from xfer.conntrack.events import set_events_sysctl
from xfer.conntrack.model import CtTuple
from xfer.conntrack.netlink import CtNetlink
from xfer.lab.hosts import Hosts
from xfer.model import Kind, parse_vm

VM_IP = "10.0.1.2"
_ESTABLISHED = wire.nest(c.CTA_PROTOINFO, wire.nest(
    c.CTA_PROTOINFO_TCP, wire.nla(c.CTA_PROTOINFO_TCP_STATE, bytes([3])),
    wire.nla(c.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, bytes([7])),
    wire.nla(c.CTA_PROTOINFO_TCP_WSCALE_REPLY, bytes([7])),
    wire.nla(c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes([0x03, 0xFF])),
    wire.nla(c.CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes([0x03, 0xFF]))))
_FIXED = b"".join([
    wire.nla(c.CTA_STATUS, struct.pack(">I", c.IPS_CONFIRMED | c.IPS_ASSURED | c.IPS_SEEN_REPLY)),
    wire.nla(c.CTA_TIMEOUT, struct.pack(">I", 3600)),
    _ESTABLISHED,
])


CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")


def make_room(entries: int) -> None:
    """Raise the host's nf_conntrack_max (one limit for every namespace) to hold ``entries``
    more, and put the old value back when the process exits. Never lowers it."""
    import atexit
    import logging

    try:
        before = int(CONNTRACK_MAX.read_text())
        in_use = int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
    except (OSError, ValueError):
        return                                      # no conntrack sysctls here: fill says why
    wanted = in_use + entries + max(65536, entries // 10)   # and room for the copies it makes
    if wanted <= before:
        return
    CONNTRACK_MAX.write_text(str(wanted))
    logging.getLogger("xfer.bench").warning("nf_conntrack_max raised from %d to %d for this run",
                                            before, wanted)
    atexit.register(CONNTRACK_MAX.write_text, str(before))


def fill(namespace: str, total: int, vm_flows: int, vm_ip: str = VM_IP) -> None:
    """Create ``total`` established TCP entries, ``vm_flows`` of them opened by ``vm_ip``
    (raising nf_conntrack_max for the run when it is too low)."""
    make_room(total)
    base_other = int(ipaddress.IPv4Address("10.64.0.0"))
    server = "10.200.0.1"

    def messages() -> Iterator[tuple[int, bytes]]:
        for i in range(total):
            src = vm_ip if i < vm_flows else str(ipaddress.IPv4Address(base_other + i // 50000))
            sport, dport = 1024 + i % 50000, 80 + (i // 50000) % 1000
            orig = CtTuple(src, server, c.IPPROTO_TCP, sport, dport)
            reply = CtTuple(server, src, c.IPPROTO_TCP, dport, sport)
            body = (wire.encode_tuple(c.CTA_TUPLE_ORIG, orig)
                    + wire.encode_tuple(c.CTA_TUPLE_REPLY, reply) + _FIXED)
            yield i + 1, wire.message(c.MSG_CT_NEW, c.NLM_F_REQUEST | c.NLM_F_CREATE, i + 1,
                                      2, body)

    with CtNetlink(namespace) as ct:
        failures = ct.batch(messages())
    if failures:
        raise RuntimeError(f"filling the table: {len(failures)} entries failed "
                           f"(nf_conntrack_max too low?)")


def _count(ns: str, vm_ip: str) -> tuple[int, int]:
    vm = parse_vm(vm_ip, {})
    with CtNetlink(ns) as ct:
        everything = len(ct.dump_stream(2))
    mine = len(transfer.kind_module(Kind.CONNTRACK).export_entries(vm, ns))
    return everything, mine


def _flush(hosts: Hosts, ns: str) -> None:
    hosts.run(ns, ["conntrack", "-F"])


def _paired_ratio(baseline: list[float], contender: list[float]) -> float:
    """Median of per-run ratios: each pair ran back to back, so drift cancels out."""
    return median([b / x for b, x in zip(baseline, contender, strict=True)])


class _Indexed:
    """The contenders with the pre-copy index: a tracker in this process, and an agent (its
    own process) whose index serves ``xfer agent export``."""

    def __init__(self, hosts: Hosts, src: str, dst: str, vm: Any, bundle_path: Path) -> None:
        import tempfile

        from xfer.conntrack.tracker import Tracker
        from xfer.lab.agents import SRC_AGENT_IP, LabAgents

        self.src, self.dst, self.vm, self.bundle_path = src, dst, vm, bundle_path
        self.tracker = Tracker(src, trust_seed=True)
        self.tracker.track([vm])
        self.tracker.start()
        self._tmp = tempfile.TemporaryDirectory(prefix="xfer-bench-index-")
        self.agents = LabAgents(hosts, Path(self._tmp.name))
        self.agents.link(src, dst)
        self.agent = self.agents.start("fw-src", src, SRC_AGENT_IP, ["conntrack"],
                                       extra="[precopy]\nevents_trusted = true\n")
        self.client = self.agents.client_args(self.agent.url)
        # the agent tracks the VM from its first pre-copy request on (its index is warm)
        from xfer.agent.client import run_sync
        from xfer.net import tls

        pki = self.agents.pki
        ctx = tls.client_context(pki / "ca.pem", pki / "operator.pem", pki / "operator.key")
        with netns.entered(src):
            run_sync(ctx, lambda c: c.precopy_changes(self.agent.url, vm, ""))

    def in_process(self) -> float:
        from xfer.conntrack.shared import section_of

        t0 = time.perf_counter()
        section = section_of(self.tracker.export(self.vm.id))
        data = bundle_mod.encode(bundle_mod.Bundle(self.vm, {"device": "src"}, {Kind.CONNTRACK: section}))
        report = transfer.import_bundle(bundle_mod.decode(data), self.dst)
        took = time.perf_counter() - t0
        if not report.ok:
            raise RuntimeError(f"xfer import failed: {report.to_dict()}")
        return took

    def processes(self, xfer: list[str]) -> float:
        e_s, _ = run_process(["ip", "netns", "exec", self.src, *xfer, "agent", "export", *self.client,
                              "--vm", VM_IP, "--out", str(self.bundle_path)])
        i_s, _ = run_process([*xfer, "import", str(self.bundle_path), "--netns", self.dst])
        return e_s + i_s

    def close(self) -> None:
        self.tracker.close()
        self.agent.stop()
        self._tmp.cleanup()


def run(total: int, vm_flows: int, repeat: int, out: Path, echo: Echo = print,
        index: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``out``) the figures.

    ``index``: also with the pre-copy index (the source keeps the VM's entries, fed by
    events, so its export walks no table): in-process (tracker + import) and as
    processes (``xfer agent export`` from an agent whose index serves it, then
    ``xfer import``).
    """
    say = echo or (lambda _m: None)
    vm = parse_vm(VM_IP, {})
    xfer = [sys.executable, "-m", "xfer.cli"]
    bundle_path = Path(f"/tmp/xfer-bench-{id(out)}.xfer")
    runs: dict[str, list[float]] = {"baseline": [], "in_process": [], "processes": []}
    if index:
        runs.update(in_process_indexed=[], processes_indexed=[])
    export_s: list[float] = []
    import_s: list[float] = []
    peak_kb = {"export": 0, "import": 0}
    compile_bytecode()
    with Hosts("xb") as hosts:
        src, dst = hosts.add("src"), hosts.add("dst")
        t = time.perf_counter()
        if index:   # every entry reports events (the deployment advice, xfer.conntrack.events)
            set_events_sysctl(src, 1)
        fill(src, total, vm_flows)
        say(f"filled {src} with {total} entries ({vm_flows} the VM's) in {time.perf_counter() - t:.1f} s")
        indexed = _Indexed(hosts, src, dst, vm, bundle_path) if index else None

        def check(label: str) -> None:
            everything, mine = _count(dst, VM_IP)
            if (everything, mine) != (vm_flows, vm_flows):
                raise RuntimeError(f"{label}: destination holds {everything} entries, "
                                   f"{mine} of the VM's; expected {vm_flows}")
            _flush(hosts, dst)

        for n in range(repeat):
            runs["baseline"].append(run_shell(
                f"ip netns exec {src} conntrack -L -s {VM_IP} -o save 2>/dev/null"
                f" | ip netns exec {dst} conntrack -R - 2>/dev/null"))
            check("baseline")

            t0 = time.perf_counter()
            b = transfer.export_bundle(vm, [Kind.CONNTRACK], src)
            data = bundle_mod.encode(b)
            t1 = time.perf_counter()
            report = transfer.import_bundle(bundle_mod.decode(data), dst)
            t2 = time.perf_counter()
            if not report.ok:
                raise RuntimeError(f"xfer import failed: {report.to_dict()}")
            runs["in_process"].append(t2 - t0)
            export_s.append(t1 - t0)
            import_s.append(t2 - t1)
            check("in-process")

            e_s, e_kb = run_process([*xfer, "export", "--vm", VM_IP, "--netns", src,
                                     "--out", str(bundle_path)])
            i_s, i_kb = run_process([*xfer, "import", str(bundle_path), "--netns", dst])
            runs["processes"].append(e_s + i_s)
            peak_kb = {"export": max(peak_kb["export"], e_kb), "import": max(peak_kb["import"], i_kb)}
            check("processes")
            if indexed is not None:
                runs["in_process_indexed"].append(indexed.in_process())
                check("in-process, indexed")
                runs["processes_indexed"].append(indexed.processes(xfer))
                check("processes, indexed")
            say(f"run {n + 1}/{repeat}: baseline {runs['baseline'][-1] * 1000:.0f} ms, "
                f"in-process {runs['in_process'][-1] * 1000:.0f} ms, "
                f"processes {runs['processes'][-1] * 1000:.0f} ms"
                + (f", indexed: in-process {runs['in_process_indexed'][-1] * 1000:.0f} ms, "
                   f"processes {runs['processes_indexed'][-1] * 1000:.0f} ms" if indexed else ""))
        if indexed is not None:
            indexed.close()
        bundle_path.unlink(missing_ok=True)

    base = median(runs["baseline"])
    result: dict[str, Any] = {
        "benchmark": "conntrack", "total": total, "vm_flows": vm_flows, "repeat": repeat,
        "baseline_tool": "conntrack -L -s VM -o save | conntrack -R -",
        "baseline_s": base,
        "scenarios": {
            "in_process": {"baseline_s": base, "xfer_s": median(runs["in_process"]),
                           "ratio": _paired_ratio(runs["baseline"], runs["in_process"]),
                           "export_s": median(export_s), "import_s": median(import_s),
                           "target_ratio": 5.0},
            "processes": {"baseline_s": base, "xfer_s": median(runs["processes"]),
                          "ratio": _paired_ratio(runs["baseline"], runs["processes"]),
                          "peak_rss_mb": max(peak_kb.values()) / 1024,
                          "peak_rss_mb_by_process": {k: v / 1024 for k, v in peak_kb.items()},
                          "target_ratio": 2.0},
        },
        "runs": runs,
    }
    if index:
        result["scenarios"].update({
            "in_process_indexed": {"baseline_s": base, "xfer_s": median(runs["in_process_indexed"]),
                                   "ratio": _paired_ratio(runs["baseline"], runs["in_process_indexed"]),
                                   "target_ratio": 5.0},
            "processes_indexed": {"baseline_s": base, "xfer_s": median(runs["processes_indexed"]),
                                  "ratio": _paired_ratio(runs["baseline"], runs["processes_indexed"]),
                                  "target_ratio": 2.0},
        })
        result["loadavg"] = os.getloadavg()
    write_results(out, result)
    for name, s in result["scenarios"].items():
        say(f"{name}: xfer {s['xfer_s'] * 1000:.1f} ms vs baseline {base * 1000:.1f} ms "
            f"→ {s['ratio']:.1f}× faster (target ≥ {s['target_ratio']:.0f}×)")
    say(f"peak memory of one xfer process: export {peak_kb['export'] / 1024:.0f} MB, "
        f"import {peak_kb['import'] / 1024:.0f} MB; results in {out}")
    return result
