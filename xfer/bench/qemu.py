"""Benchmark of the QEMU hook: the guest downtime xfer adds on top of the state transfer.

Real QEMU (TCG, no disk, 64 MB) migrating over 127.0.0.1, the same guest hopping
from process to process; a real HTTP stand-in manager on 127.0.0.1 whose handler
takes ``transfer_ms`` (the state transfer, measured on the server side). Runs
alternate in the same loop so drift hits every contender alike:

* ``baseline``: the same migration without the hook (no pause-before-switchover);
* ``pause_noop``: the hook with a no-op message (no HTTP): what QEMU's
  pause-before-switchover itself costs (entering the window takes QEMU ~1 ms
  more than going straight to the device state) plus the hook's QMP round trips;
* ``hook_0ms``: the hook with an instant manager: what owning the window costs;
* ``hook_<N>ms``: the hook with a manager that takes N ms;
* ``hook_tls_0ms``: an https manager (self-signed, openssl(1)), connection and
  TLS handshake made before the window, as the hook does;
* ``hook_tls_cold_0ms``: the same, but connecting inside the window: what
  opening the connection early saves.

Per hooked scenario: ``overhead_ms`` = window held (QEMU entering pre-switchover
→ migrate-continue sent) minus the handler's time — the extra downtime caused by
xfer, target under 5 ms; ``downtime_delta_ms`` = QEMU's downtime minus the
baseline's minus the handler's time (QEMU reports whole ms): the same figure seen
by QEMU, including what pause-before-switchover itself costs QEMU. ``baseline_s`` /
``xfer_s`` are QEMU's downtimes without / with the hook and ``ratio`` is
baseline / xfer as in every xfer benchmark (below 1: the hook adds time).

    run(repeat=10, transfer_ms=50, out=Path("bench/results/qemu.json"), echo=print)
"""

from __future__ import annotations

import asyncio
import ssl
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xfer.bench.common import Echo, median, write_results
from xfer.hypervisor import migrate
from xfer.hypervisor.hook import HookOptions, Notify
from xfer.hypervisor.report import WindowReport
from xfer.lab.qemu import QemuPair
from xfer.lab.stub_manager import StubManager, self_signed_tls
from xfer.net.message import MigrationMessage
from xfer.net.notify import send_migration_message

TARGET_OVERHEAD_MS = 5.0


@dataclass(frozen=True)
class Contender:
    hooked: bool
    handler_s: float = 0.0
    http: bool = True     # False: the hook with a no-op message (no HTTP, no manager)
    tls: bool = False     # https manager
    cold: bool = False    # connect (and handshake) inside the window instead of before it


async def _no_message(message: MigrationMessage, deadline: float) -> dict[str, Any]:
    return {}


async def _migrate(pair: QemuPair, managers: dict[bool, StubManager], client_tls: ssl.SSLContext,
                   who: Contender) -> tuple[WindowReport, float]:
    """One migration; returns its report and the stand-in manager's handler time."""
    mgr = managers[who.tls]
    mgr.delay_s = who.handler_s
    seen = len(mgr.received)
    opts = HookOptions(vm="bench-vm", manager=mgr.url, source="hv-a", destination="hv-b",
                       deadline_s=5.0, wait_s=30, finish_s=30, ssl_context=client_tls if who.tls else None)
    notify: Notify | None = None
    if not who.http:
        notify = _no_message
    elif who.cold:
        async def notify(message: MigrationMessage, deadline: float) -> dict[str, Any]:
            return await send_migration_message(opts.manager, message, deadline, opts.ssl_context)
    report = await migrate.run_migration(pair.src.qmp, pair.dst.qmp, pair.uri(), opts,
                                         notify=notify, use_hook=who.hooked)
    if report.status != "completed" or (who.hooked and not report.ok):
        raise RuntimeError(f"migration failed: {report.to_dict()}")
    handler = sum(r.handler_s or 0.0 for r in mgr.received[seen:])
    pair.swap()
    return report, handler


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    return {"median": round(statistics.median(ordered), 3), "p95": round(p95, 3),
            "max": round(ordered[-1], 3)}


def _row(report: WindowReport, handler_s: float) -> dict[str, float]:
    d = report.to_dict()
    window = d["window_ms"] or 0.0
    return {"downtime_ms": float(d["downtime_ms"]), "handler_ms": handler_s * 1000,
            "guest_gap_ms": d["guest_gap_ms"], "window_ms": window,
            "overhead_ms": window - handler_s * 1000, "window_entry_ms": d["window_entry_ms"] or 0.0}


async def _runs(repeat: int, transfer_ms: float, memory_mb: int, say: Echo) -> dict[str, Any]:
    contenders = {"baseline": Contender(False), "pause_noop": Contender(True, http=False),
                  "hook_0ms": Contender(True), f"hook_{transfer_ms:g}ms": Contender(True, transfer_ms / 1000),
                  "hook_tls_0ms": Contender(True, tls=True),
                  "hook_tls_cold_0ms": Contender(True, tls=True, cold=True)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    with QemuPair(memory_mb=memory_mb) as pair:
        server_tls, client_tls = self_signed_tls(pair.dir)
        async with StubManager() as plain, StubManager(ssl_context=server_tls) as tls:
            managers = {False: plain, True: tls}
            for who in contenders.values():
                await _migrate(pair, managers, client_tls, who)  # warm-up: first connections, imports
            for n in range(repeat):
                for name, who in contenders.items():
                    runs[name].append(_row(*await _migrate(pair, managers, client_tls, who)))
                if say:
                    say(f"run {n + 1}/{repeat}: " + ", ".join(
                        f"{name} downtime {r[-1]['downtime_ms']:.0f} ms" for name, r in runs.items()))
    return runs


def run(repeat: int, transfer_ms: float, out: Path, echo: Echo = print,
        memory_mb: int = 64) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``out``) the figures."""
    runs = asyncio.run(_runs(repeat, transfer_ms, memory_mb, echo))
    base = median([r["downtime_ms"] for r in runs["baseline"]])
    scenarios: dict[str, Any] = {"baseline": {
        "downtime_ms": _ms([r["downtime_ms"] for r in runs["baseline"]]),
        "guest_gap_ms": _ms([r["guest_gap_ms"] for r in runs["baseline"]])}}
    for name, rs in runs.items():
        if name == "baseline":
            continue
        xfer = median([r["downtime_ms"] for r in rs])
        overhead = _ms([r["overhead_ms"] for r in rs])
        scenarios[name] = {
            "baseline_s": base / 1000, "xfer_s": xfer / 1000, "ratio": base / xfer if xfer else None,
            "handler_ms": _ms([r["handler_ms"] for r in rs]),
            "window_ms": _ms([r["window_ms"] for r in rs]),
            "overhead_ms": overhead,
            "downtime_delta_ms": round(median([r["downtime_ms"] - r["handler_ms"] for r in rs]) - base, 3),
            "guest_gap_ms": _ms([r["guest_gap_ms"] for r in rs]),
            "window_entry_ms": _ms([r["window_entry_ms"] for r in rs]),
            "target_overhead_ms": TARGET_OVERHEAD_MS,
            "within_target": overhead["median"] < TARGET_OVERHEAD_MS,
        }
    result = {"benchmark": "qemu", "repeat": repeat, "transfer_ms": transfer_ms, "memory_mb": memory_mb,
              "qemu": "qemu-system-x86_64 -accel tcg, no disk, migration over tcp:127.0.0.1",
              "baseline": "the same migration without the hook (no pause-before-switchover)",
              "scenarios": scenarios, "runs": runs}
    write_results(out, result)
    if echo:
        echo(f"baseline: QEMU downtime {base:.1f} ms (median)")
        for name, s in scenarios.items():
            if name != "baseline":
                echo(f"{name}: downtime {s['xfer_s'] * 1000:.1f} ms, "
                     f"handler {s['handler_ms']['median']:.1f} ms, window {s['window_ms']['median']:.1f} ms"
                     f" → overhead {s['overhead_ms']['median']:.2f} ms "
                     f"(p95 {s['overhead_ms']['p95']:.2f}; target < {TARGET_OVERHEAD_MS:.0f}), "
                     f"downtime vs baseline minus handler {s['downtime_delta_ms']:+.1f} ms")
        echo(f"results in {out}")
    return result
