"""`xfer bench precopy`: what the pause costs with pre-copy against without, same run.

One run fills a source namespace with ``total`` entries, ``vm_flows`` of them the
VM's, then per round:

  without pre-copy (the baseline: today's pause)  export the VM's entries, bundle,
      import them at the destination — all inside the pause;
  with pre-copy  the source's tracker (events + index) and the destination's stage
      copy the VM's entries while it runs, ``churn`` of them change (new, updated,
      destroyed: a third each), one delta round goes, they churn again, and then —
      the pause — only the last delta moves and the destination commits.

Both are measured ``in_process`` (the device code alone) and, with ``--manager``,
through a manager and two agents over mutual TLS (``through_manager``). After
each round the destination must hold exactly the source's entries of the VM.
Ratios are baseline time / pre-copy time (higher is better).
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer import transfer
from xfer.bench.common import Echo, median, write_results
from xfer.bench.conntrack import VM_IP, fill
from xfer.conntrack import constants as c
from xfer.conntrack import wire
from xfer.conntrack.events import set_events_sysctl
from xfer.conntrack.model import CtTuple
from xfer.conntrack.netlink import CtNetlink, table_size
from xfer.conntrack.staging import Stage
from xfer.conntrack.tracker import Tracker
from xfer.lab.hosts import Hosts
from xfer.model import Kind, VmIdentity, parse_vm

SERVER = "10.200.0.1"
_ESTABLISHED = wire.nest(c.CTA_PROTOINFO, wire.nest(
    c.CTA_PROTOINFO_TCP, wire.nla(c.CTA_PROTOINFO_TCP_STATE, bytes([3])),
    wire.nla(c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, bytes([0x03, 0xFF])),
    wire.nla(c.CTA_PROTOINFO_TCP_FLAGS_REPLY, bytes([0x03, 0xFF]))))


def _entry(sport: int, *, mark: int = 0, vm_ip: str = VM_IP) -> bytes:
    orig = CtTuple(vm_ip, SERVER, c.IPPROTO_TCP, sport, 443)
    reply = CtTuple(SERVER, vm_ip, c.IPPROTO_TCP, 443, sport)
    return b"".join([wire.encode_tuple(c.CTA_TUPLE_ORIG, orig), wire.encode_tuple(c.CTA_TUPLE_REPLY, reply),
                     wire.nla(c.CTA_STATUS, struct.pack(">I", c.IPS_CONFIRMED | c.IPS_ASSURED
                                                         | c.IPS_SEEN_REPLY)),
                     wire.nla(c.CTA_TIMEOUT, struct.pack(">I", 3600)),
                     wire.nla(c.CTA_MARK, struct.pack(">I", mark)), _ESTABLISHED])


class Churn:
    """Changes to the VM's flows while it runs: new flows, updated ones (mark), closed ones."""

    def __init__(self, namespace: str, vm_flows: int, vm_ip: str = VM_IP) -> None:
        self.namespace = namespace
        self.vm_ip = vm_ip
        self.live: list[int] = []  # sports of flows this churn opened, which it may close
        self.next_port = 20000 + vm_flows
        self.marks = 0

    def step(self, changes: int, conns: int) -> None:
        """``changes`` changes: a third new flows, a third marked, a third closed."""
        third = max(1, changes // 3)
        new = list(range(self.next_port, self.next_port + third))
        self.next_port += third
        self.marks += 1
        msgs: list[bytes] = []
        seq = 0
        for p in new:
            seq += 1
            msgs.append(wire.message(c.MSG_CT_NEW, c.NLM_F_REQUEST | c.NLM_F_CREATE | c.NLM_F_EXCL,
                                     seq, 2, _entry(p, vm_ip=self.vm_ip)))
        # update the oldest flows of the bulk (opened by ``fill``: sports from 1024)
        for p in range(1024, 1024 + min(third, conns)):
            seq += 1
            orig = wire.encode_tuple(c.CTA_TUPLE_ORIG, CtTuple(self.vm_ip, SERVER, c.IPPROTO_TCP, p, 80))
            msgs.append(wire.message(c.MSG_CT_NEW, c.NLM_F_REQUEST, seq, 2,
                                     orig + wire.nla(c.CTA_MARK, struct.pack(">I", self.marks))))
        closing, self.live = self.live[:third], self.live[third:]
        for p in closing:
            seq += 1
            orig = wire.encode_tuple(c.CTA_TUPLE_ORIG, CtTuple(self.vm_ip, SERVER, c.IPPROTO_TCP, p, 443))
            msgs.append(wire.message(c.MSG_CT_DELETE, c.NLM_F_REQUEST, seq, 2, orig))
        self.live += new
        with CtNetlink(self.namespace) as ct:
            failures = ct.batch(enumerate(msgs, 1))
        if failures:
            raise RuntimeError(f"churn: {len(failures)} of {len(msgs)} changes failed")


def vm_facts(namespace: str, vm: VmIdentity) -> set[tuple[object, ...]]:
    """The VM's entries without what changes by itself (timeout, use, id)."""
    out: set[tuple[object, ...]] = set()
    for e in transfer.kind_module(Kind.CONNTRACK).export_entries(vm, namespace):
        p = wire.parse_entry(e.family, e.blob)
        out.add((p.orig, p.reply, p.status & ~c.IPS_CONFIRMED, p.mark, p.labels,
                 p.tcp.state if p.tcp else None))
    return out


def _flush(hosts: Hosts, ns: str) -> None:
    hosts.run(ns, ["conntrack", "-F"])


def _check(src: str, dst: str, vm: VmIdentity, label: str) -> None:
    want, got = vm_facts(src, vm), vm_facts(dst, vm)
    if want != got:
        raise RuntimeError(f"{label}: destination differs from the source: {len(want - got)} "
                           f"missing, {len(got - want)} stale")


def _without(src: str, dst: str, vm: VmIdentity) -> float:
    t0 = time.perf_counter()
    b = transfer.export_bundle(vm, [Kind.CONNTRACK], src)
    data = bundle_mod.encode(b)
    report = transfer.import_bundle(bundle_mod.decode(data), dst)
    elapsed = time.perf_counter() - t0
    if not report.ok:
        raise RuntimeError(f"import failed: {report.to_dict()}")
    return elapsed


def _with(tracker: Tracker, churn: Churn, dst: str, vm: VmIdentity, changes: int,
          conns: int) -> tuple[float, dict[str, float]]:
    phases: dict[str, float] = {}
    t = time.perf_counter()
    with Stage(vm, dst) as stage:
        bulk, cursor = tracker.snapshot(vm.id)
        stage.apply(bulk)
        phases["bulk_s"] = time.perf_counter() - t
        churn.step(changes, conns)
        delta = tracker.changes(vm.id, cursor)
        stage.apply(delta.upserts, delta.deletes)
        churn.step(changes, conns)
        time.sleep(0.05)  # the events of the last churn reach the tracker's thread
        # the pause
        t0 = time.perf_counter()
        last = tracker.changes(vm.id, delta.cursor)
        stage.apply(last.upserts, last.deletes, final=True)
        stage.commit()
        pause = time.perf_counter() - t0
    phases["last_delta_entries"] = len(last.upserts) + len(last.deletes)
    return pause, phases


def run(total: int, vm_flows: int, churn_ratio: float, repeat: int, out: Path,
        echo: Echo = print) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``out``) the figures."""
    say = echo or (lambda _m: None)
    vm = parse_vm(VM_IP, {})
    changes = max(3, int(vm_flows * churn_ratio))
    runs: dict[str, list[float]] = {"without": [], "with": []}
    details: list[dict[str, float]] = []
    load = os.getloadavg()
    with Hosts("xp") as hosts:
        src, dst = hosts.add("src"), hosts.add("dst")
        # every entry reports events from the start (the deployment advice, see events.py)
        set_events_sysctl(src, 1)
        t = time.perf_counter()
        fill(src, total, vm_flows)
        say(f"filled {src} with {total} entries ({vm_flows} the VM's) in "
            f"{time.perf_counter() - t:.1f} s; host table {table_size(None)} here")
        churn = Churn(src, vm_flows)
        with Tracker(src, trust_seed=True) as tracker:
            t = time.perf_counter()
            tracker.track([vm])
            tracker.start()
            say(f"tracker seeded with {tracker.index.count(vm.id)} entries in "
                f"{time.perf_counter() - t:.2f} s")
            for n in range(repeat):
                runs["without"].append(_without(src, dst, vm))
                _check(src, dst, vm, "without pre-copy")
                _flush(hosts, dst)
                pause, phases = _with(tracker, churn, dst, vm, changes, vm_flows)
                runs["with"].append(pause)
                details.append(phases)
                _check(src, dst, vm, "with pre-copy")
                _flush(hosts, dst)
                say(f"run {n + 1}/{repeat}: pause without pre-copy {runs['without'][-1] * 1000:.1f} ms, "
                    f"with pre-copy {pause * 1000:.2f} ms ({int(phases['last_delta_entries'])} "
                    f"entries in the last delta; bulk copy before the pause "
                    f"{phases['bulk_s'] * 1000:.0f} ms)")
    base, pre = median(runs["without"]), median(runs["with"])
    ratios = [b / w for b, w in zip(runs["without"], runs["with"], strict=True)]
    result: dict[str, Any] = {
        "benchmark": "precopy", "total": total, "vm_flows": vm_flows, "churn": churn_ratio,
        "changes_per_round": changes, "repeat": repeat, "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "baseline_tool": "no pre-copy: export + import of the VM's entries inside the pause",
        "scenarios": {"in_process": {"baseline_s": base, "xfer_s": pre, "ratio": median(ratios),
                                     "pause_ms": pre * 1000, "target_ms": 15.0, "target_ratio": 10.0,
                                     "bulk_s": median([d["bulk_s"] for d in details])}},
        "baseline_s": base, "xfer_s": pre, "ratio": median(ratios),
        "runs": runs,
    }
    write_results(out, result)
    say(f"in-process: pause {pre * 1000:.2f} ms with pre-copy vs {base * 1000:.1f} ms without "
        f"→ {median(ratios):.1f}× (target ≤ 15 ms and ≥ 10×); results in {out}")
    return result


