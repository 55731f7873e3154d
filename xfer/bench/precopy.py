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

import asyncio
import contextlib
import os
import ssl
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from xfer import bundle as bundle_mod
from xfer import netns, pki, transfer
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
from xfer.manager.migration import LATE_MIGRATING_S
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


TOPOLOGY = """
servers:
  hv-src: {gateway: core}
  hv-dst: {gateway: core}
gateways: [core]
devices:
  fw-src: {type: firewall, kinds: [conntrack], agent: "https://10.0.4.1:7443"}
  fw-dst: {type: firewall, kinds: [conntrack], agent: "https://10.0.4.2:7443"}
links:
  - [hv-src, fw-src]
  - [fw-src, core]
  - [hv-dst, fw-dst]
  - [fw-dst, core]
vms:
%s
"""
MANAGER_PORT = 8700


@contextlib.contextmanager
def managed(hosts: Hosts, src: str, dst: str, workdir: Path, interval_s: float = 0.2,
            vms: dict[str, str] | None = None, extra: str = "", link: bool = True,
            agent_extra: str = "") -> Iterator[tuple[str, ssl.SSLContext]]:
    """Agents on both firewalls and a manager (in the source's namespace, on the agents'
    link), as processes; yields the manager's URL and the operator's TLS context.
    ``extra``: more of the manager's configuration (a ``[journal]`` section); ``link``
    False: the agents' link is there from an earlier ``managed`` in these namespaces;
    ``agent_extra``: more of both agents' (a ``[privsep]`` section)."""
    workdir.mkdir(parents=True, exist_ok=True)
    from xfer.lab.agents import DST_AGENT_IP, OPERATOR, SRC_AGENT_IP, LabAgents
    from xfer.lab.manager_lab import ManagerProcess
    from xfer.net import tls

    agents = LabAgents(hosts, workdir)
    if link:
        agents.link(src, dst)
    # the source table was filled with nf_conntrack_events=1: every entry reports events
    agents.start("fw-src", src, SRC_AGENT_IP, ["conntrack"],
                 extra="[precopy]\nevents_trusted = true\n" + agent_extra)
    agents.start("fw-dst", dst, DST_AGENT_IP, ["conntrack"], extra=agent_extra)
    pki.issue(agents.pki, "manager", ips=[SRC_AGENT_IP])
    vms = vms or {"vm1": VM_IP}
    (workdir / "topology.yaml").write_text(
        TOPOLOGY % "\n".join(f'  {name}: {{ipv4: ["{ip}"]}}' for name, ip in vms.items()))
    config = workdir / "manager.toml"
    config.write_text(f"""
[manager]
topology = "topology.yaml"
journal = "{workdir / 'manager.db'}"
mode = "relay"
cleanup = "age-out"
budget_ms = 300
precopy_interval_s = {interval_s}

[listen]
address = "{SRC_AGENT_IP}"
port = {MANAGER_PORT}

[tls]
cert = "pki/manager.pem"
key = "pki/manager.key"
ca = "pki/ca.pem"
""" + extra)
    url = f"https://{SRC_AGENT_IP}:{MANAGER_PORT}/v1/migrations"
    manager = ManagerProcess(hosts, "manager", src, config, workdir / "manager.log", url)
    manager.start()
    try:
        yield url, tls.client_context(agents.pki / "ca.pem", agents.pki / f"{OPERATOR}.pem",
                                      agents.pki / f"{OPERATOR}.key")
    finally:
        manager.stop()
        for agent in agents.agents:
            agent.stop()


async def _send(url: str, ctx: ssl.SSLContext, indication: str, mode: str) -> tuple[float, dict[str, Any]]:
    """One message over a connection opened beforehand (as the hook does); seconds to the answer."""
    from xfer.net.message import MigrationMessage, Mode
    from xfer.net.notify import ManagerLink

    message = MigrationMessage("vm1", indication, "out", "hv-src", "hv-dst", None, Mode.of(mode))
    async with ManagerLink(url, ctx) as link:
        await link.open(1)
        t0 = time.perf_counter()
        answer = await link.send(message, time.monotonic() + 60)
        return time.perf_counter() - t0, answer


def _through_manager(hosts: Hosts, src: str, dst: str, vm: VmIdentity, churn: Churn, changes: int,
                     vm_flows: int, repeat: int, mode: str, say: Callable[[str], None],
                     privsep: bool = False) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {"without": [], "with": [], "with_pause_ms": [], "last_delta": []}
    with tempfile.TemporaryDirectory(prefix="xfer-bench-precopy-") as tmp:
        Path(tmp).chmod(0o711)          # agents with [privsep] reach their journals as nobody
        with managed(hosts, src, dst, Path(tmp),
                     agent_extra='\n[privsep]\nuser = "nobody"\n' if privsep else "") as (url, ctx):
            _rounds(hosts, src, dst, vm, churn, changes, vm_flows, repeat, mode, say, url, ctx, runs)
    return runs


def _rounds(hosts: Hosts, src: str, dst: str, vm: VmIdentity, churn: Churn, changes: int,
            vm_flows: int, repeat: int, mode: str, say: Callable[[str], None], url: str,
            ctx: ssl.SSLContext, runs: dict[str, list[float]]) -> None:
    for n in range(repeat):
        with netns.entered(src):
            took, answer = asyncio.run(_send(url, ctx, "not-running", mode))
        if answer.get("state") != "committed":
            raise RuntimeError(f"without pre-copy: {answer}")
        runs["without"].append(took)
        _check(src, dst, vm, "through the manager, without pre-copy")
        _flush(hosts, dst)
        time.sleep(LATE_MIGRATING_S + 0.1)  # a new migration, not the one just switched over
        with netns.entered(src):
            _, prepared = asyncio.run(_send(url, ctx, "migrating", mode))
        if prepared.get("state") != "prepared":
            raise RuntimeError(f"pre-copy did not start: {prepared}")
        churn.step(changes, vm_flows)
        time.sleep(0.5)  # rounds of changes go while the VM runs
        churn.step(changes, vm_flows)
        with netns.entered(src):
            took, answer = asyncio.run(_send(url, ctx, "not-running", mode))
        if answer.get("state") != "committed" or not answer.get("precopy"):
            raise RuntimeError(f"with pre-copy: {answer}")
        runs["with"].append(took)
        runs["with_pause_ms"].append(float(answer["pause_ms"]))
        _check(src, dst, vm, "through the manager, with pre-copy")
        _flush(hosts, dst)
        time.sleep(LATE_MIGRATING_S + 0.1)
        say(f"  through the manager ({mode}) run {n + 1}/{repeat}: pause without pre-copy "
            f"{runs['without'][-1] * 1000:.1f} ms, with {took * 1000:.2f} ms "
            f"(manager's pause_ms {answer['pause_ms']:.2f}; staged {answer['precopy']['staged']}, "
            f"{answer['precopy']['deltas']} deltas)")


def run(total: int, vm_flows: int, churn_ratio: float, repeat: int, out: Path,
        echo: Echo = print, manager: bool = True, mode: str = "relay",
        privsep: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``out``) the figures. ``privsep``: the agents
    run separated (docs/privsep.md), their kernel work in their privileged helpers."""
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
        managed_runs = (_through_manager(hosts, src, dst, vm, churn, changes, vm_flows, repeat, mode, say,
                                         privsep) if manager else None)
    base, pre = median(runs["without"]), median(runs["with"])
    ratios = [b / w for b, w in zip(runs["without"], runs["with"], strict=True)]
    scenarios: dict[str, Any] = {}
    if managed_runs is not None:
        mb, mw = median(managed_runs["without"]), median(managed_runs["with"])
        mratio = median([b / w for b, w in zip(managed_runs["without"], managed_runs["with"], strict=True)])
        scenarios["through_manager"] = {
            "mode": mode, "privsep": privsep, "baseline_s": mb, "xfer_s": mw, "ratio": mratio,
            "pause_ms": mw * 1000,
            "manager_pause_ms": median(managed_runs["with_pause_ms"]),
            "target_ms": 15.0, "target_ratio": 10.0,
            "meets_target": mw * 1000 <= 15.0 and mratio >= 10.0}
    result: dict[str, Any] = {
        "benchmark": "precopy", "total": total, "vm_flows": vm_flows, "churn": churn_ratio,
        "changes_per_round": changes, "repeat": repeat, "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "baseline_tool": "no pre-copy: export + import of the VM's entries inside the pause",
        "scenarios": {"in_process": {"baseline_s": base, "xfer_s": pre, "ratio": median(ratios),
                                     "pause_ms": pre * 1000, "target_ms": 15.0, "target_ratio": 10.0,
                                     "bulk_s": median([d["bulk_s"] for d in details])},
                      **scenarios},
        "baseline_s": base, "xfer_s": pre, "ratio": median(ratios),
        "runs": {"in_process": runs, **({"through_manager": managed_runs} if managed_runs else {})},
    }
    write_results(out, result)
    say(f"in-process: pause {pre * 1000:.2f} ms with pre-copy vs {base * 1000:.1f} ms without "
        f"→ {median(ratios):.1f}× (target ≤ 15 ms and ≥ 10×)")
    if "through_manager" in scenarios:
        m = scenarios["through_manager"]
        say(f"through the manager ({mode}): pause {m['xfer_s'] * 1000:.2f} ms with pre-copy vs "
            f"{m['baseline_s'] * 1000:.1f} ms without → {m['ratio']:.1f}× (target ≤ 15 ms and ≥ 10×)")
    say(f"results in {out}")
    return result


