"""`xfer bench migrate`: what the manager adds to the data movement, in each mode.

One run per flow count builds the manager lab (xfer.lab.manager_lab: the source
firewall holds conntrack, the DHCP binding and the counters; the destination has
a separate firewall and snooping switch), fills the source with the VM's
``flows`` conntrack entries, and times, back to back in each round:

  direct_push   operator → source agent: push conntrack+counters to the destination
                firewall and, at the same time, dhcp to the switch (the baseline:
                the same data movement, no manager)
  relay, pull, push, store
                migration message → the manager's answer, which it gives once every
                destination device has committed (store: "out" then "in")
  devices       the device-driven variant: "out" then "in" as datagrams to the multicast
                group the agents and the manager join (sent from the manager's namespace);
                the source agent deposits, the destination agents collect and report, the
                manager answers "in" once both committed

Contenders take turns at running first. Connections to the manager and agents are
opened before each timed message (the hook does the same before the window). The
manager runs with ``cleanup: age-out`` so the source keeps its state from round
to round; after each contender the destinations must hold exactly the VM's
entries and binding, then they are cleared. Overhead = contender - direct push
of the same round (median over rounds).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xfer import netns as xnetns
from xfer import transfer
from xfer.agent.client import AgentClient
from xfer.bench.common import Echo, median, write_results
from xfer.bench.conntrack import fill
from xfer.lab.agents import OPERATOR
from xfer.lab.manager_lab import DESTINATION, MANAGER_IP, MCAST_GROUP, MCAST_PORT, SOURCE, VM_MAC, ManagerLab
from xfer.lab.topology import GW_IP, VM_IP, VM_IP6
from xfer.model import Kind, parse_vm
from xfer.net import tls
from xfer.net.message import encode, messages_for
from xfer.net.notify import ManagerLink

MODES = ("relay", "pull", "push", "store")
VARIANTS = (*MODES, "devices")    # "devices": store mode, device-driven (multicast)
CONTENDERS = ("direct_push", *VARIANTS)
TARGET_OVERHEAD_S = 0.020
TARGET_TOTAL_1K_S = 0.050
VM = parse_vm(f"{VM_IP},{VM_IP6},{VM_MAC}", {})


@contextmanager
def _lab(flows: int) -> Iterator[ManagerLab]:
    with tempfile.TemporaryDirectory(prefix="xfer-bench-migrate-") as tmp:
        saved = os.environ.get("XFER_DHCP_STATE_DIR")
        os.environ["XFER_DHCP_STATE_DIR"] = str(Path(tmp) / "dhcp")   # agents inherit it
        try:
            with ManagerLab("xbm", Path(tmp), cleanup="age-out") as lab:
                lab.up()
                fill(lab.ns["fwsrc"], flows, flows)
                lab.start_agents()
                lab.start_manager()
                # Counted traffic for the counters kind; its ICMP entry is not one of the flows.
                lab.hosts.check(lab.ns["vm"], ["ping", "-q", "-c", "3", "-i", "0.01", GW_IP])
                lab.hosts.run(lab.ns["fwsrc"], ["conntrack", "-D", "-p", "icmp"])
                yield lab
        finally:
            if saved is None:
                os.environ.pop("XFER_DHCP_STATE_DIR", None)
            else:
                os.environ["XFER_DHCP_STATE_DIR"] = saved


def _settle(lab: ManagerLab, flows: int, label: str) -> None:
    """The destinations hold exactly the VM's entries and binding; then clear them."""
    fw, sw = lab.ns["fwdst"], lab.ns["swdst"]
    mine = len(transfer.kind_module(Kind.CONNTRACK).export_entries(VM, fw))
    bound = transfer.export_bundle(VM, [Kind.DHCP], sw).sections[Kind.DHCP].count
    if mine != flows or bound != 1:
        raise RuntimeError(f"{label}: destination holds {mine} of {flows} entries and {bound} binding(s)")
    lab.hosts.run(fw, ["conntrack", "-F"])
    transfer.forget(VM, [Kind.COUNTERS], fw)
    transfer.forget(VM, [Kind.DHCP], sw)


async def _rounds(lab: ManagerLab, flows: int, repeat: int, say: Echo) -> dict[str, Any]:
    assert lab.lab_agents is not None
    pki = lab.lab_agents.pki
    ctx = tls.client_context(pki / "ca.pem", pki / f"{OPERATOR}.pem", pki / f"{OPERATOR}.key")
    urls = {name: agent.url for name, agent in lab.agents.items()}
    runs: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    reports: dict[str, list[dict[str, Any]]] = {m: [] for m in VARIANTS}

    async with AgentClient(ctx) as agents:
        async def direct_push() -> Callable[[], Awaitable[Any]]:
            await agents.health(urls["fw-src"])    # a warm connection, like the manager's

            async def go() -> Any:
                return await asyncio.gather(
                    agents.push(urls["fw-src"], VM, [Kind.CONNTRACK, Kind.COUNTERS], urls["fw-dst"]),
                    agents.push(urls["fw-src"], VM, [Kind.DHCP], urls["sw-dst"]))
            return go

        def by_manager(mode: str) -> Callable[[], Awaitable[Callable[[], Awaitable[Any]]]]:
            async def prepare() -> Callable[[], Awaitable[Any]]:
                messages = messages_for("vm1", SOURCE, DESTINATION, None, mode)
                link = ManagerLink(lab.url, ctx)
                await link.open(len(messages))

                async def go() -> Any:
                    try:
                        answers = [await link.send(m, time.monotonic() + 30) for m in messages]
                    finally:
                        await link.close()
                    reports[mode].append(answers[-1])
                    return answers
                return go
            return prepare

        rounds = iter(range(1_000_000))

        async def by_group() -> Callable[[], Awaitable[Any]]:
            # Datagrams leave from the manager's address, as `xfer notify --udp GROUP` would;
            # each round's messages have their own ids (copies of one message act once).
            n = next(rounds)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((MANAGER_IP, 0))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(MANAGER_IP))
            sock.setblocking(False)
            msgs = [m.to_json() | {"id": f"bench-{os.getpid()}-{n}-{m.direction}"}
                    for m in messages_for("vm1", SOURCE, DESTINATION, None, "store")]

            async def go() -> Any:
                loop = asyncio.get_running_loop()
                answers = []
                try:
                    for body in msgs:
                        await loop.sock_sendto(sock, encode(body), (MCAST_GROUP, MCAST_PORT))
                        data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), 30)
                        answers.append(json.loads(data))
                        if not answers[-1].get("ok"):
                            raise RuntimeError(f"device-driven migration failed: {answers[-1].get('error')}")
                finally:
                    sock.close()
                reports["devices"].append(answers[-1])
                return answers
            return go

        prepare = {"direct_push": direct_push, **{m: by_manager(m) for m in MODES}, "devices": by_group}
        for n in range(repeat + 1):
            order = list(CONTENDERS[n % len(CONTENDERS):] + CONTENDERS[:n % len(CONTENDERS)])
            times: dict[str, float] = {}
            for name in order:
                go = await prepare[name]()
                gc.collect()
                t0 = time.perf_counter()
                await go()
                times[name] = time.perf_counter() - t0
                _settle(lab, flows, name)
            line = ", ".join(f"{k} {times[k] * 1000:.1f} ms" for k in CONTENDERS)
            if n == 0:
                if say:
                    say(f"  cold round (left out): {line}")
                continue
            for k, v in times.items():
                runs[k].append(v)
            if say:
                say(f"  round {n}/{repeat}: {line}")
    return {"runs": runs, "reports": reports}


def _phase_medians(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Median ms of each phase name (summed per report when several devices ran it)."""
    per: dict[str, list[float]] = {}
    for r in reports:
        sums: dict[str, float] = {}
        for p in r.get("phases", []):
            sums[f"{p['name']}:{p['device']}"] = sums.get(f"{p['name']}:{p['device']}", 0.0) + (p["ms"] or 0)
        for k, v in sums.items():
            per.setdefault(k, []).append(v)
    return {k: round(median(v), 3) for k, v in sorted(per.items())}


def _scenario(runs: dict[str, list[float]], mode: str, flows: int) -> dict[str, Any]:
    pairs = list(zip(runs["direct_push"], runs[mode], strict=True))
    overhead = median([x - b for b, x in pairs])
    xfer_s = median(runs[mode])
    out = {"baseline_s": median(runs["direct_push"]), "xfer_s": xfer_s,
           "ratio": median([x / b for b, x in pairs]), "overhead_s": overhead,
           "target_overhead_s": TARGET_OVERHEAD_S, "meets_target": overhead < TARGET_OVERHEAD_S}
    if flows <= 1000:
        out.update(target_total_s=TARGET_TOTAL_1K_S, meets_total_target=xfer_s < TARGET_TOTAL_1K_S)
    return out


def run(flow_counts: tuple[int, ...] = (1000, 20000), repeat: int = 5,
        out: Path = Path("bench/results/migrate.json"), echo: Echo = print) -> dict[str, Any]:
    """Run the benchmark at each flow count; returns (and writes to ``out``) the figures."""
    say = echo or (lambda _m: None)
    by_flows: dict[str, Any] = {}
    for flows in flow_counts:
        with _lab(flows) as lab:
            say(f"{flows} conntrack entries + a binding + counters of vm1, {len(CONTENDERS)} contenders")
            # The operator's and the hook's connections come from the management namespace.
            with xnetns.entered(lab.ns["mg"]):
                figures = asyncio.run(_rounds(lab, flows, repeat, say))
        runs = figures["runs"]
        scenarios = {m: _scenario(runs, m, flows) for m in VARIANTS}
        by_flows[str(flows)] = {
            "flows": flows, "direct_push_s": median(runs["direct_push"]), "scenarios": scenarios,
            "manager_phases_ms": {m: _phase_medians(r) for m, r in figures["reports"].items()},
            "runs": runs,
        }
        for m, s in scenarios.items():
            total = (f"; total target {s['target_total_s'] * 1000:.0f} ms "
                     f"{'met' if s['meets_total_target'] else 'MISSED'}") if "target_total_s" in s else ""
            say(f"  {m}: {s['xfer_s'] * 1000:.1f} ms vs direct push {s['baseline_s'] * 1000:.1f} ms → "
                f"{s['overhead_s'] * 1000:+.1f} ms ({s['ratio']:.2f}×; target +"
                f"{TARGET_OVERHEAD_S * 1000:.0f} ms{total})")
    result: dict[str, Any] = {
        "benchmark": "migrate", "repeat": repeat, "kinds": ["conntrack", "counters", "dhcp"],
        "baseline": "direct agent-to-agent push of the same kinds to the same devices, same run",
        "measured": "migration message sent -> manager's answer (every destination committed)",
        "by_flows": by_flows,
    }
    write_results(out, result)
    say(f"results in {out}")
    return result
