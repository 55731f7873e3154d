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
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer import transfer
from xfer.bench.common import Echo, compile_bytecode, median, run_process, run_shell, write_results
from xfer.conntrack import constants as c
from xfer.conntrack import wire
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


def fill(namespace: str, total: int, vm_flows: int, vm_ip: str = VM_IP) -> None:
    """Create ``total`` established TCP entries, ``vm_flows`` of them opened by ``vm_ip``."""
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


def run(total: int, vm_flows: int, repeat: int, out: Path, echo: Echo = print) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``out``) the figures."""
    say = echo or (lambda _m: None)
    vm = parse_vm(VM_IP, {})
    xfer = [sys.executable, "-m", "xfer.cli"]
    bundle_path = Path(f"/tmp/xfer-bench-{id(out)}.xfer")
    runs: dict[str, list[float]] = {"baseline": [], "in_process": [], "processes": []}
    export_s: list[float] = []
    import_s: list[float] = []
    peak_kb = {"export": 0, "import": 0}
    compile_bytecode()
    with Hosts("xb") as hosts:
        src, dst = hosts.add("src"), hosts.add("dst")
        t = time.perf_counter()
        fill(src, total, vm_flows)
        say(f"filled {src} with {total} entries ({vm_flows} the VM's) in {time.perf_counter() - t:.1f} s")

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
            say(f"run {n + 1}/{repeat}: baseline {runs['baseline'][-1] * 1000:.0f} ms, "
                f"in-process {runs['in_process'][-1] * 1000:.0f} ms, "
                f"processes {runs['processes'][-1] * 1000:.0f} ms")
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
    write_results(out, result)
    for name, s in result["scenarios"].items():
        say(f"{name}: xfer {s['xfer_s'] * 1000:.1f} ms vs baseline {base * 1000:.1f} ms "
            f"→ {s['ratio']:.1f}× faster (target ≥ {s['target_ratio']:.0f}×)")
    say(f"peak memory of one xfer process: export {peak_kb['export'] / 1024:.0f} MB, "
        f"import {peak_kb['import'] / 1024:.0f} MB; results in {out}")
    return result
